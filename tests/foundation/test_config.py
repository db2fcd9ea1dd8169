import subprocess
import sys
from pathlib import Path

import pytest

from loopstack.errors import ConfigError
from pretrain.config import dump_config, load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_resolves(path):
    cfg = load_config(path)
    assert cfg.model.loops >= 1 and cfg.train.steps >= 0
    assert load_config(path).model == cfg.model  # deterministic


def test_base_inheritance_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {loops: 3, d_model: 64, n_heads: 4}\ntrain: {lr: 0.001}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nmodel: {loops: 5}\n")
    cfg = load_config(tmp_path / "child.yaml", ["train.lr=3e-4", "parallel.tp=2", "eval.loops=[1, 2]"])
    assert cfg.model.loops == 5 and cfg.model.d_model == 64  # merged, not replaced
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.parallel.tp == 2 and cfg.eval.loops == [1, 2]
    # what config show prints loads back to the same config
    (tmp_path / "dumped.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "dumped.yaml") == cfg


def _error(tmp_path, text, overrides=()):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(p, list(overrides))
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    msg = _error(tmp_path, "model: {loopz: 4}\n")
    assert "c.yaml" in msg and "model.loopz" in msg and "did you mean 'model.loops'" in msg
    msg = _error(tmp_path, "trian: {}\n")
    assert "'trian'" in msg and "'train'" in msg


def test_wrong_type_and_range(tmp_path):
    msg = _error(tmp_path, "train: {lr: fast}\n")
    assert "train.lr" in msg and "'fast'" in msg and "expected a number" in msg
    msg = _error(tmp_path, "model: {loops: 0}\n")
    assert "model.loops" in msg and ">= 1" in msg
    msg = _error(tmp_path, "parallel: {zero_stage: 4}\n")
    assert "parallel.zero_stage" in msg and "<= 3" in msg
    msg = _error(tmp_path, "model: {variant: nope}\n")
    assert "model.variant" in msg and "'flt'" in msg
    msg = _error(tmp_path, "train: {steps: true}\n")
    assert "train.steps" in msg and "integer" in msg


def test_override_errors_name_the_flag(tmp_path):
    msg = _error(tmp_path, "{}\n", ["train.lr=fast"])
    assert msg.startswith("--set train.lr") and "expected a number" in msg
    msg = _error(tmp_path, "{}\n", ["model.loopz=3"])
    assert "--set model.loopz" in msg and "model.loops" in msg
    msg = _error(tmp_path, "{}\n", ["model.loops"])
    assert "KEY=VALUE" in msg


def test_cross_field_checks(tmp_path):
    msg = _error(tmp_path, "model: {d_model: 64, n_heads: 6}\n")
    assert "model.d_model" in msg and "n_heads" in msg
    msg = _error(tmp_path, "model: {d_model: 60, n_heads: 3}\nparallel: {tp: 2}\n")
    assert "model.n_heads = 3" in msg and "parallel.tp = 2" in msg


def test_bad_yaml_and_missing_file(tmp_path):
    msg = _error(tmp_path, "model: {loops: [\n")
    assert "c.yaml" in msg and "invalid YAML" in msg
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "loopstack.cli", *args], capture_output=True, text=True,
                          cwd=ROOT)


def test_cli_config_show_and_errors(tmp_path):
    out = _cli("config", "show", "configs/smoke-cpu.yaml", "--set", "model.loops=7")
    assert out.returncode == 0, out.stderr
    assert "loops: 7" in out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: " + str(ROOT / "configs/smoke-cpu.yaml") + "\nmodel: {loopz: 4}\n")
    out = _cli("config", "validate", str(bad))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "model.loopz" in out.stderr
    out = _cli("config", "show", "configs/smoke-cpu.yaml", "--set", "train.lr=fast")
    assert out.returncode == 2 and "train.lr" in out.stderr and "Traceback" not in out.stderr


def test_cli_help_version_env_are_light():
    out = _cli("--help")
    assert out.returncode == 0 and "config" in out.stdout
    assert _cli("--version").stdout.startswith("loopstack ")
    out = _cli("env")
    assert out.returncode == 0
    for name in ("python", "torch", "deepspeed", "megatron-core", "datasets", "sentencepiece", "pyarrow", "wandb"):
        assert name in out.stdout
    # --help must not pay for torch / megatron-core imports
    code = "import sys; from loopstack.cli import build_parser; build_parser(); " \
           "print(sorted(m for m in ('torch', 'megatron', 'datasets', 'deepspeed') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_empty_config_file_is_refused(tmp_path):
    for text in ("", "# only a comment\n", "\n\n"):
        msg = _error(tmp_path, text)
        assert "c.yaml: empty config file" in msg, msg


def test_config_diff_names_dotted_keys():
    from pretrain.config import config_diff

    old = {"model": {"d_model": 64, "loops": 3}, "train": {"lr": 0.1}, "name": "a"}
    new = {"model": {"d_model": 128, "loops": 3}, "train": {"lr": 0.1}, "name": "a", "extra": 1}
    assert config_diff(old, new) == ["extra: <unset> -> 1", "model.d_model: 64 -> 128"]
