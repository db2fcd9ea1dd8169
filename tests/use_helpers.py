"""Tiny run directories for the tests of what uses a trained model (generate, export, harness, eval --task):
random weights in a whole-weights checkpoint (`pretrain.weights.save_whole_checkpoint`), the synthetic tasks'
character tokenizer, and a config.yaml, in well under a second (no training)."""

from __future__ import annotations

from pathlib import Path

import torch


def make_run(tmp_path: Path, variant: str = "flt", *, name: str | None = None, seed: int = 0, scale: float = 0.5,
             **model_overrides) -> Path:
    """A run directory `load_run` accepts: a tiny `variant` model (tests/models/helpers.tiny plus overrides) whose
    weights are drawn from N(0, scale) (norm scales from N(1, scale); LoRA B banks included, so nothing is
    trivially zero or one).
    Builds the model in this process (starts a one-process group and TP=1 parallel state if none exists)."""
    from data_pipeline.synth import synth_tokenizer
    from data_pipeline.tokenizer import save_tokenizer
    from loopstack.typed_config import to_dict
    from pretrain.config import config_from_dict, save_config
    from pretrain.inference import init_single_process
    from pretrain.models import build_model
    from pretrain.weights import save_whole_checkpoint
    from tests.models.helpers import tiny

    run = tmp_path / (name or f"run-{variant}")
    run.mkdir(parents=True)
    tok = save_tokenizer(synth_tokenizer(), run / "tokenizer")
    mcfg = tiny(variant, **model_overrides)
    data = {"name": run.name, "seed": seed, "tokenizer": {"dir": str(run / "tokenizer")},
            "data": {"seq_len": 32}, "model": to_dict(mcfg)}
    cfg = config_from_dict(data, "make_run")
    init_single_process(seed)
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.loop, tok.vocab_size, device="cpu")
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():  # norm scales around 1, everything else around 0
            p.copy_(torch.randn(p.shape, generator=gen) * scale + (1.0 if p.optim_role == "norm" else 0.0))
    save_config(cfg, run / "config.yaml")
    save_whole_checkpoint(run, model.state_dict(), to_dict(cfg), tok.sha256, step=0, noise_seed=model._noise_seed)
    return run
