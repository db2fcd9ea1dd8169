"""`loopstack convert hf`: tiny Llama / Qwen2 / Qwen3 / GPT-2 models built locally with transformers (random weights,
nothing downloaded) become loopstack runs. With no sharing the converted model's logits and greedy tokens equal the
source's; with a shared core the config, shapes and core inits are checked, and full-rank per-loop LoRA (SVD of
each layer's difference to the shared weights) gives the source back exactly. A converted GPT-2 exported with
`export hf` loads in transformers and computes the same logits."""

from __future__ import annotations

import json
import os
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from loopstack.errors import UserError
from tests.data_pipeline.test_hf_tokenizer import make_hf_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB = 300  # the tokenizer's 300 tokens; loopstack pads to 384 and masks the rest
TOKENS = torch.tensor([[5, 17, 260, 42, 99, 1, 7, 250, 33, 64, 8, 120], [9, 8, 7, 6, 5, 4, 3, 2, 10, 11, 12, 13]])


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return make_hf_tokenizer(tmp_path_factory.mktemp("hf") / "tok")


def make_source(path: Path, tok_dir: Path, kind: str = "llama", *, layers: int = 4, tie: bool = False,
                shared_norms: bool = False, seed: int = 0, shard: bool = False):
    """A random-weight HF model saved to `path` with the test tokenizer. Every weight ~ N(0, 0.2) (norm scales
    1 + N(0, 0.2)); `shared_norms`: all layers get the same norm scales (and no biases differ), so a shared core
    with full-rank LoRA can represent the source exactly."""
    import transformers

    cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
           "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}[kind]
    config = getattr(transformers, cls[0])(
        hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, tie_word_embeddings=tie, rope_theta=500.0, rms_norm_eps=1e-5, head_dim=16,
        attn_implementation="eager")
    torch.manual_seed(seed)
    model = getattr(transformers, cls[1])(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = name.endswith("norm.weight")
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if is_norm else 0.0))
        if shared_norms:
            first = model.model.layers[0]
            for layer in model.model.layers[1:]:
                for name, p in layer.named_parameters():
                    if name.endswith("norm.weight") or name.endswith(".bias"):
                        p.copy_(dict(first.named_parameters())[name])
    model.save_pretrained(str(path), max_shard_size="200KB" if shard else "5GB")  # shard: index + several files
    for f in tok_dir.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    return model


def make_gpt2(path: Path, tok_dir: Path, *, layers: int = 4, tie: bool = True, seed: int = 0):
    """A random-weight GPT2LMHeadModel (n_embd 64, 4 heads, 64 positions) saved to `path` with the test tokenizer:
    weights and biases N(0, 0.2), LayerNorm weights 1 + N(0, 0.2), position table N(0, 0.2)."""
    import transformers

    config = transformers.GPT2Config(n_embd=64, n_layer=layers, n_head=4, vocab_size=VOCAB, n_positions=64,
                                     tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
                                     attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = (".ln_" in name or name.startswith("transformer.ln_f")) and name.endswith(".weight")
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if is_norm else 0.0))
    model.save_pretrained(str(path))
    for f in tok_dir.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    return model


def convert(src: Path, out: Path, n_core: int, *, n_prelude=None, n_coda=None, loops=None, init="stepwise",
            rank: int = 0) -> int:
    from pretrain.hf.convert import run_convert

    return run_convert(Namespace(src=str(src), out=str(out), n_core=n_core, n_prelude=n_prelude, n_coda=n_coda,
                                 loops=loops, init=init, loop_lora_rank=rank))


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


def ours(out: Path):
    from pretrain.inference import load_run

    return load_run(out)


def our_logits(loaded, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(tokens).logits[..., :VOCAB].float()


def hf_greedy(model, tokens: torch.Tensor, n: int) -> torch.Tensor:
    out = tokens
    for _ in range(n):
        out = torch.cat((out, hf_logits(model, out)[:, -1].argmax(-1, keepdim=True)), dim=1)
    return out


@pytest.mark.parametrize("kind,tie", [("llama", False), ("qwen2", False), ("qwen3", True)])
def test_no_sharing_equals_the_source(tmp_path, tok_dir, kind, tie, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    model = make_source(src, tok_dir, kind, tie=tie, shard=kind == "qwen2")
    assert (src / "model.safetensors.index.json").is_file() == (kind == "qwen2")
    assert convert(src, out, 4) == 0
    printed = capsys.readouterr().out
    assert "core 3 <- layer 3" in printed and f"loopstack generate {out}" in printed and "loopstack train" in printed
    loaded = ours(out)
    cfg = loaded.cfg
    assert (cfg.model.n_core, cfg.model.loops, cfg.model.tie_embeddings) == (4, 1, tie)
    assert cfg.model.qkv_bias == (kind == "qwen2") and cfg.model.qk_norm == (kind == "qwen3")
    assert cfg.tokenizer.kind == "hf" and Path(cfg.tokenizer.dir) == (out / "tokenizer").resolve()
    assert loaded.tokenizer.encode("def add") == json.loads(json.dumps(loaded.tokenizer.encode("def add")))
    want, got = hf_logits(model, TOKENS), our_logits(loaded, TOKENS)
    assert want.abs().max() > 1.0  # weights large enough that a wrong sign or order shows
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.isinf(loaded.model(TOKENS).logits[..., VOCAB:]).all()  # padded ids masked
    assert torch.equal(loaded.model.generate(TOKENS, 6), hf_greedy(model, TOKENS, 6))


@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_no_sharing_equals_the_source(tmp_path, tok_dir, tie):
    """GPT-2 (LayerNorm with biases, learned positions, GELU, Conv1D weights, fused c_attn) with no sharing: the
    converted model's logits and greedy tokens are the source's."""
    src, out = tmp_path / "src", tmp_path / "out"
    model = make_gpt2(src, tok_dir, tie=tie)
    assert convert(src, out, 4) == 0
    loaded = ours(out)
    m = loaded.cfg.model
    assert (m.mlp, m.norm_kind, m.position, m.max_positions, m.norm_eps) == ("gelu", "layer", "learned", 64, 1e-5)
    assert m.qkv_bias and m.proj_bias and not m.qk_norm and m.tie_embeddings == tie and m.mlp_hidden == 256
    assert (m.n_core, m.loops) == (4, 1) and loaded.cfg.data.seq_len == 64
    want, got = hf_logits(model, TOKENS), our_logits(loaded, TOKENS)
    assert want.abs().max() > 1.0
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(loaded.model.generate(TOKENS, 6), hf_greedy(model, TOKENS, 6))


def test_gpt2_shared_core_and_export(tmp_path, tok_dir):
    """GPT-2 with a shared core (average init) and per-loop LoRA: the core weights are the group means of the
    transposed / split source tensors (biases and LayerNorm biases too), the position table and final norm are
    copied, LoRA covers every projection (no gate); the no-sharing conversion exported with `export hf` loads in
    transformers and gives loopstack's (and the source's) logits."""
    from pretrain.hf.export import export_hf

    src, out = tmp_path / "src", tmp_path / "out"
    model = make_gpt2(src, tok_dir, layers=6)
    convert(src, out, 2, n_prelude=1, n_coda=1, init="average", rank=8)  # middle layers 1..4 -> core 2 x 2 loops
    loaded = ours(out)
    state = loaded.model.state_dict()
    h, d = model.transformer.h, 64

    def mean(group, get):
        return torch.stack([get(h[j]).detach() for j in group]).mean(0)

    for i, group in enumerate(([1, 3], [2, 4])):
        checks = {"attn.wq.weight": lambda b: b.attn.c_attn.weight[:, :d].t(),
                  "attn.wv.bias": lambda b: b.attn.c_attn.bias[2 * d:],
                  "attn.wo.weight": lambda b: b.attn.c_proj.weight.t(),
                  "mlp.w_up.bias": lambda b: b.mlp.c_fc.bias, "mlp.w_down.weight": lambda b: b.mlp.c_proj.weight.t(),
                  "attn_norm.bias": lambda b: b.ln_1.bias, "mlp_norm.weight": lambda b: b.ln_2.weight}
        for name, get in checks.items():
            torch.testing.assert_close(state[f"core.{i}.{name}"], mean(group, get), msg=name)
    torch.testing.assert_close(state["coda.0.attn.wk.weight"], h[5].attn.c_attn.weight[:, d:2 * d].t().detach())
    assert torch.equal(state["pos_embed.weight"], model.transformer.wpe.weight.detach())
    assert torch.equal(state["norm.bias"], model.transformer.ln_f.bias.detach())
    assert sorted(k.split(".")[2] for k in state if k.startswith("loop_lora.0.") and k.endswith(".A")) == \
        ["w_down", "w_up", "wk", "wo", "wq", "wv"]
    assert state["loop_lora.1.w_up.A"].shape == (2, 8, 64) and state["loop_lora.1.w_up.B"].shape == (2, 256, 8)

    plain = tmp_path / "plain"
    convert(src, plain, 6)
    run = ours(plain)
    exported = export_hf(run, tmp_path / "exported", log=lambda *_: None)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True).eval()
    assert (hf.config.position, hf.config.norm_kind, hf.config.mlp) == ("learned", "layer", "gelu")
    with torch.no_grad():
        got = hf(TOKENS, use_cache=False).logits
        want = run.model(TOKENS).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got[..., :VOCAB], hf_logits(model, TOKENS), atol=1e-4, rtol=1e-4)
    res = hf.generate(TOKENS[:1], max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(res, hf_greedy(model, TOKENS[:1], 6))


def test_rope_sign_flip_is_needed(tmp_path, tok_dir):
    """Without the flip of wq/wk's second halves the logits differ: the equality above is not vacuous."""
    from pretrain.hf import convert as cv

    src, out = tmp_path / "src", tmp_path / "out"
    model = make_source(src, tok_dir, "llama")
    flip = cv._flip_rope
    cv._flip_rope = lambda t, heads, hd: t
    try:
        convert(src, out, 4)
    finally:
        cv._flip_rope = flip
    assert (our_logits(ours(out), TOKENS) - hf_logits(model, TOKENS)).abs().max() > 1e-2


@pytest.mark.parametrize("init", ["average", "select", "stepwise"])
def test_shared_core_inits(tmp_path, tok_dir, init):
    from pretrain.config import load_config
    from pretrain.hf.convert import stepwise_sources

    src, out = tmp_path / "src", tmp_path / "out"
    model = make_source(src, tok_dir, "qwen2", layers=6)
    convert(src, out, 2, n_prelude=1, n_coda=1, init=init)  # middle layers 1..4 -> core 2 x 2 loops
    cfg = load_config(out / "config.yaml")  # a valid config as the CLI reads it
    m = cfg.model
    assert (m.n_prelude, m.n_core, m.n_coda, m.loops, m.variant, m.injection, m.state_init) == \
        (1, 2, 1, 2, "looped", "none", "embed")
    assert cfg.train.lr == 3e-5 and cfg.data.sources == []
    loaded = ours(out)  # names and shapes checked against the checkpoint by load_run
    state = loaded.model.state_dict()
    assert state["core.0.mlp.w_up.weight"].shape == (96, 64) and state["core.1.attn.wk.bias"].shape == (32,)
    hf_layers = model.model.layers
    sources = {"average": [[1, 3], [2, 4]], "select": [[1], [2]], "stepwise": [[1], [4]]}[init]
    assert stepwise_sources(4, 2) == [0, 3] and stepwise_sources(6, 3) == [0, 2, 5]
    for i, group in enumerate(sources):
        for ours_name, theirs in (("mlp.w_up.weight", "mlp.up_proj.weight"), ("attn.wv.bias", "self_attn.v_proj.bias"),
                                  ("mlp_norm.weight", "post_attention_layernorm.weight")):
            mean = torch.stack([dict(hf_layers[j].named_parameters())[theirs] for j in group]).mean(0)
            torch.testing.assert_close(state[f"core.{i}.{ours_name}"], mean.detach())
    torch.testing.assert_close(state["prelude.0.mlp.w_down.weight"], hf_layers[0].mlp.down_proj.weight.detach())
    torch.testing.assert_close(state["coda.0.mlp.w_down.weight"], hf_layers[5].mlp.down_proj.weight.detach())
    if init != "average":
        return
    # a looped model deeper than the source (3 loops of the 2 source groups): the same core, the coda still the
    # source's last layer, per-loop LoRA of loops past the source's groups from the last group
    deeper = tmp_path / "deeper"
    convert(src, deeper, 2, n_prelude=1, n_coda=1, loops=3, init=init, rank=64)
    loaded = ours(deeper)
    assert loaded.cfg.model.loops == 3
    got = loaded.model.state_dict()
    for name in ("core.0.mlp.w_up.weight", "coda.0.mlp.w_down.weight", "prelude.0.attn.wq.weight"):
        assert torch.equal(got[name], state[name]), name
    bank = got["loop_lora.1.w_up.A"], got["loop_lora.1.w_up.B"]
    assert bank[0].shape[0] == 3
    shared = state["core.1.mlp.w_up.weight"]
    for t, layer in ((0, 2), (1, 4), (2, 4)):
        torch.testing.assert_close(shared + bank[1][t] @ bank[0][t], hf_layers[layer].mlp.up_proj.weight.detach(),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,init", [("llama", "average"), ("qwen3", "select"), ("llama", "stepwise")])
def test_full_rank_loop_lora_gives_back_the_source(tmp_path, tok_dir, kind, init):
    src, out = tmp_path / "src", tmp_path / "out"
    model = make_source(src, tok_dir, kind, layers=6, shared_norms=True)
    convert(src, out, 2, n_prelude=1, n_coda=1, init=init, rank=64)  # 64 = min(out, in) of every projection
    loaded = ours(out)
    assert loaded.model.state_dict()["loop_lora.1.w_down.A"].shape == (2, 64, 96)
    torch.testing.assert_close(our_logits(loaded, TOKENS), hf_logits(model, TOKENS), atol=1e-4, rtol=1e-4)
    if init != "average":
        return
    # a low rank approximates each layer's weights (closer than the shared weights alone), the model is not exact
    convert(src, tmp_path / "r8", 2, n_prelude=1, n_coda=1, init=init, rank=8)
    low = ours(tmp_path / "r8")
    assert (our_logits(low, TOKENS) - hf_logits(model, TOKENS)).abs().max() > 1e-3
    st = low.model.state_dict()
    target = model.model.layers[3].mlp.up_proj.weight.detach()  # loop 1, core layer 0
    shared = st["core.0.mlp.w_up.weight"]
    approx = shared + st["loop_lora.0.w_up.B"][1] @ st["loop_lora.0.w_up.A"][1]
    assert torch.linalg.norm(target - approx) < 0.95 * torch.linalg.norm(target - shared)


def test_svd_lora_factors():
    from pretrain.hf.convert import svd_lora

    delta = torch.randn(12, 7, generator=torch.Generator().manual_seed(0))
    a, b = svd_lora(delta, 10, scale=0.5)  # rank above min(out, in): the extra rows stay zero
    assert a.shape == (10, 7) and b.shape == (12, 10) and not a[7:].any() and not b[:, 7:].any()
    torch.testing.assert_close(0.5 * b @ a, delta, atol=1e-5, rtol=1e-5)
    a, b = svd_lora(delta, 2, scale=1.0)
    s = np.linalg.svd(delta.numpy(), compute_uv=False)
    assert abs(float(torch.linalg.norm(delta - b @ a)) - float(np.sqrt((s[2:] ** 2).sum()))) < 1e-4


def _error(capsys, *argv) -> str:
    from loopstack.cli import main

    assert main(["convert", "hf", *map(str, argv)]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("loopstack: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_inputs_are_one_line_errors(tmp_path, tok_dir, capsys):
    src = tmp_path / "src"
    make_source(src, tok_dir, "llama")
    out = tmp_path / "out"
    capsys.readouterr()
    assert "nothing-here: not a directory" in _error(capsys, tmp_path / "nothing-here", out, "--n-core", 4)
    (tmp_path / "empty").mkdir()
    assert "config.json: missing" in _error(capsys, tmp_path / "empty", out, "--n-core", 4)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    for bad, message in (({"model_type": "gpt_neox"}, "model_type 'gpt_neox' is not supported"),
                         ({"activation_function": "relu"}, "activation_function = 'relu'"),
                         ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx = true"),
                         ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn = true"),
                         ({"n_embd": 0}, "n_embd = 0")):
        hf = {"model_type": "gpt2", "n_layer": 4, "n_embd": 64, "n_head": 4, "vocab_size": 300, "n_positions": 64}
        (gpt2 / "config.json").write_text(json.dumps({**hf, **bad}))
        assert message in _error(capsys, gpt2, out, "--n-core", 4)
    assert "not a multiple of --n-core 3" in _error(capsys, src, out, "--n-core", 3)
    assert "not a multiple of --n-core 2 (for --init average)" in _error(capsys, src, out, "--n-core", 2,
                                                                         "--loops", 2, "--n-prelude", 1,
                                                                         "--init", "average")
    scaled = tmp_path / "scaled"
    scaled.mkdir()
    for f in src.iterdir():
        (scaled / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0}
    (scaled / "config.json").write_text(json.dumps(cfg))
    assert "rope_type = 'llama3'" in _error(capsys, scaled, out, "--n-core", 4)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type="mistral", sliding_window=4096)
    (scaled / "config.json").write_text(json.dumps(cfg))
    assert "sliding_window = 4096" in _error(capsys, scaled, out, "--n-core", 4)
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "exists and is not empty" in _error(capsys, src, out, "--n-core", 4)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not list(tmp_path.glob(".out.convert-*"))
    with pytest.raises(UserError, match="no \\*.safetensors"):
        (src / "model.safetensors").unlink()
        convert(src, tmp_path / "out2", 4)
