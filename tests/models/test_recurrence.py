"""The recurrence registry (recurrence.py), the 'add a recurrence' recipe of docs/models.md followed by a test
family, and declared parameter roles."""

import typing

import pytest
import torch
from torch import nn

from pretrain.models import param_roles
from pretrain.models.config import Injection, resolve_switches
from pretrain.models.layers import declare_role, replicated
from pretrain.models.recurrence import REGISTRY, Recurrence, family
from tests.models.helpers import VARIANTS, batch, build, grads, tiny


def test_registry_has_every_family():
    assert set(REGISTRY) == set(typing.get_args(Injection)) | {"restart"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_builds_its_family(tp1, variant):
    cfg = tiny(variant)
    model = build(cfg)
    assert type(model.recurrence) is REGISTRY[family(resolve_switches(cfg))]
    assert model.recurrence is model.injection  # registered as `injection`: parameter names injection.*


class Gated(Recurrence):
    """A test family, added as docs/models.md says: u = sigmoid(g) h + e, one gate per channel (init 0: 1/2)."""

    def create(self, d, init_std, dtype):
        self.gate = replicated(nn.Parameter(torch.zeros(d, dtype=dtype)), "injection")

    def enter(self, h, e):
        return torch.sigmoid(self.gate) * h + e


def test_add_a_recurrence(tp1, monkeypatch):
    monkeypatch.setitem(REGISTRY, "gated", Gated)  # the one registry line
    cfg = tiny("recall", injection="gated")  # every other switch of the recipe composes with it
    model = build(cfg)
    assert isinstance(model.recurrence, Gated) and param_roles(model)["injection.gate"] == "injection"
    tokens, labels = batch()
    out = model(tokens, labels, diagnostics=True)
    out.loss.backward()
    assert grads(model)["injection.gate"].abs().sum() > 0
    # at init u = h / 2 + e, not the additive family's h + e
    assert not torch.equal(out.loss, build(tiny("recall"))(tokens, labels).loss)


def test_param_roles_are_declared(tp1):
    model = build(tiny("flt"))
    model.core[0].extra = nn.Parameter(torch.zeros(2, 2))  # a new 2-D parameter without a role
    with pytest.raises(ValueError, match=r"core\.0\.extra \(no role declared\)"):
        param_roles(model)
    model.core[0].extra.optim_role = "muon"
    with pytest.raises(ValueError, match=r"core\.0\.extra \(unknown role 'muon'\)"):
        param_roles(model)
    declare_role(model.core[0].extra, "matrix")
    assert param_roles(model)["core.0.extra"] == "matrix"
    with pytest.raises(ValueError, match="unknown optimizer role"):
        declare_role(model.core[0].extra, "gain")
