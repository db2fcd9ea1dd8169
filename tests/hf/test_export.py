"""`loopstack export hf`: the exported transformers model (trust_remote_code) computes what loopstack computes.

Every variant, with weights randomised so nothing is trivially zero or one (LoRA B banks included), is exported
from an in-process model, loaded with `AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` and
compared with `LoopedLM` on the logits (1e-5, fp32) at the trained loop count and at loops=6 set at load; greedy
`generate` (KV cache) gives loopstack's tokens; a left-padded batch gives each prompt's own result; the tokenizer
encodes and decodes as sentencepiece; a non-empty OUT is refused; the CLI exports a run directory.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from data_pipeline.synth import synth_tokenizer  # noqa: E402
from data_pipeline.tokenizer import Tokenizer, train_sentencepiece  # noqa: E402
from loopstack.errors import UserError  # noqa: E402
from pretrain.checkpoint import CheckpointInfo  # noqa: E402
from pretrain.config import RunConfig  # noqa: E402
from pretrain.hf import export as export_mod  # noqa: E402
from pretrain.hf.export import export_hf, sentencepiece_to_hf  # noqa: E402
from pretrain.inference import Loaded  # noqa: E402
from pretrain.models.generate import generate  # noqa: E402
from tests.models.helpers import VARIANTS, build, gpt2_like, tiny  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# the extra models: per-loop LoRA + GQA + qkv biases + untied head + swiglu + norm_eps; and LoRA on two projections
# with alpha, no qk-norm, no soft-cap, prelude and coda, recall inside both sublayers; GPT-2-style options (LayerNorm
# with bias, learned positions, GELU, biases on every projection) on a plain model and on Parcae (its input norm and
# outer-loop norms are LayerNorms then too); the learned exit gate's weights travel (unused: every loop runs)
EXTRA = {
    "gpt2-like": gpt2_like("looped", n_prelude=1, n_coda=1, logit_softcap=0.0),
    "parcae+gpt2-options": gpt2_like("parcae", loop_lora_rank=2, tie_embeddings=False),
    "flt+lora+gqa+bias+untied": tiny("flt", loop_lora_rank=2, n_kv_heads=1, qkv_bias=True, tie_embeddings=False,
                                     mlp="swiglu", norm_eps=1e-5),
    "recall_internal+options": tiny("recall_internal", internal_recall="sublayer", qk_norm=False, logit_softcap=0.0,
                                    n_prelude=1, n_coda=1, loop_lora_rank=2, loop_lora_alpha=4.0,
                                    loop_lora_targets=["wq", "w_down"], exit_gate=True),
}
CASES = {**{v: tiny(v) for v in VARIANTS}, **EXTRA}
TEXTS = ["def f(x):\n\treturn  x   + 1\n", "  leading spaces,\ttabs\t\tand\n\n\nnewlines   ",
         "héllo wörld — 日本語 😀 ✓ ünïcode", "a , b . c ' d n't", "<s> text </s> <unk> <pad> <0x41> x\u2581y", "",
         "abc,12;=x", "    if a:\n        b = [1, 2]  # ok\r\n"]


@pytest.fixture(scope="module")
def tp1():
    from pretrain.distributed import init_distributed, shutdown

    env = init_distributed(tp=1, seed=0)
    yield env
    shutdown()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(synth_tokenizer())


def randomised(cfg, tok: Tokenizer, seed: int = 0):
    """A LoopedLM of `cfg` in eval mode whose every parameter is random: norm scales N(1, 0.3), the rest
    N(0, 0.3) (LoRA B banks start at zero: filled too)."""
    model = build(cfg, vocab=tok.vocab_size, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.optim_role == "norm" else 0.0))
    return model.eval()


def loaded(model, tok: Tokenizer) -> Loaded:
    return Loaded(model=model, cfg=RunConfig(model=model.cfg), tokenizer=tok,
                  info=CheckpointInfo(Path("in-process"), 0, {}), run_dir=Path("in-process"))


def load_hf(out: Path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, **kw).eval()


def until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos) + 1] if eos in ids else ids


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_loopstack(tp1, tok, tmp_path, case):
    cfg = CASES[case]
    model = randomised(cfg, tok)
    out = export_hf(loaded(model, tok), tmp_path / "out", log=lambda *_: None)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["README.md", "config.json", "configuration_loopstack.py", "generation_config.json", "loopstack_export.json",
         "model.safetensors", "modeling_loopstack.py", "tokenizer.json", "tokenizer_config.json"])
    from safetensors.torch import load_file

    state = load_file(out / "model.safetensors")  # loopstack's TP=1 state dict, names unchanged, tensors only
    assert state.keys() == {k for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "loopstack" and config["loops"] == cfg.loops
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_loopstack.LoopstackForCausalLM"

    tokens = torch.randint(0, tok.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    for loops in (None, 6):
        hf = load_hf(out) if loops is None else load_hf(out, loops=loops)
        assert hf.config.loops == (loops or cfg.loops)
        with torch.no_grad():
            want = model(tokens, loops=loops).logits
            got = hf(tokens, use_cache=False).logits
        assert got.shape == want.shape == (2, 11, 128)
        assert torch.isneginf(got[..., tok.vocab_size:]).all() and torch.isfinite(got[..., :tok.vocab_size]).all()
        assert want[..., :tok.vocab_size].std() > 0.5  # not a trivial model
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=f"{case}, loops {loops or cfg.loops}")


@pytest.mark.parametrize("case", ["flt+lora+gqa+bias+untied", "huginn", "parcae", "gpt2-like"])
def test_greedy_generate_equals_loopstack(tp1, tok, tmp_path, case):
    """transformers' generate (DynamicCache, one slot per (loop, layer)) gives loopstack's greedy tokens, at the
    trained loop count (and, for parcae, at loops=8 set at load)."""
    model = randomised(CASES[case], tok, seed=1)
    out = export_hf(loaded(model, tok), tmp_path / "out", log=lambda *_: None)
    prompt = torch.tensor([tok.encode("ab,cd;e2=")])
    for loops in (None, 8) if case == "parcae" else (None,):
        hf = load_hf(out) if loops is None else load_hf(out, loops=loops)
        want = generate(model, prompt, 8, loops=loops, temperature=0)[0, prompt.shape[1]:].tolist()
        res = hf.generate(prompt, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
        got = res.sequences[0, prompt.shape[1]:].tolist()
        assert until_eos(got, tok.eos_id) == until_eos(want, tok.eos_id), f"{case}, loops {loops}"
        assert len(res.cache.layers) == hf.config.num_hidden_layers == \
            CASES[case].n_prelude + (loops or CASES[case].loops) * CASES[case].n_core + CASES[case].n_coda
        assert res.cache.get_seq_length() == res.sequences.shape[1] - 1  # filled up to the last token fed


@pytest.mark.parametrize("case", ["flt", "parcae", "gpt2-like"])
def test_left_padded_batch(tp1, tok, tmp_path, case):
    """Two prompts of different lengths, left-padded with a 2-D mask: each row's next-token logits and greedy
    continuation are those of its prompt alone (parcae: the random h_0 follows the real positions; gpt2-like: so do
    the learned position embeddings)."""
    model = randomised(CASES[case], tok, seed=2)
    hf = load_hf(export_hf(loaded(model, tok), tmp_path / "out", log=lambda *_: None))
    prompts = [tok.encode("abc,de;f1=x"), tok.encode("xy;3=")]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        last = hf(ids, attention_mask=mask, use_cache=False).logits[:, -1]
    res = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    for row, p in enumerate(prompts):
        alone = torch.tensor([p])
        with torch.no_grad():
            want = model(alone).logits[0, -1]
        torch.testing.assert_close(last[row], want, rtol=0, atol=1e-4)  # masked attention: another kernel path
        cont = generate(model, alone, 8, temperature=0)[0, len(p):].tolist()
        assert until_eos(res[row, width:].tolist(), tok.eos_id) == until_eos(cont, tok.eos_id)


def _sentencepiece(model_type: str) -> Tokenizer:
    """A small tokenizer trained as `loopstack data train-tokenizer` trains (byte fallback, whitespace pieces)."""
    text = (REPO / "data_pipeline" / "tokenizer.py").read_text() + "\nhéllo wörld — ünïcode ✓\n\tx = 1\n"
    sentences = [text[i:i + 1000] for i in range(0, len(text), 1000)]
    return Tokenizer(train_sentencepiece(
        iter(sentences), vocab_size=420, model_type=model_type, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, split_by_whitespace=True, num_threads=1))


@pytest.mark.parametrize("kind", ["synth", "bpe", "unigram"])
def test_tokenizer_round_trip(tok, tmp_path, kind):
    """AutoTokenizer on the exported files encodes like Tokenizer.encode (no BOS, no prefix space, special-token
    text as text) and decodes like Tokenizer.decode."""
    from transformers import AutoTokenizer

    sp = tok if kind == "synth" else _sentencepiece(kind)
    sentencepiece_to_hf(sp, tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == \
        (sp.bos_id, sp.eos_id, sp.pad_id, sp.unk_id)
    for text in TEXTS:
        ids = sp.encode(text)
        assert hf.encode(text) == ids == hf(text)["input_ids"], text
        if sp.unk_id not in ids:  # sentencepiece decodes unknown as " ⁇ ", HF as "<unk>"
            assert hf.decode(ids) == sp.decode(ids), text
            if kind != "synth" and "\u2581" not in text:  # a literal U+2581 decodes as a space (sentencepiece)
                assert hf.decode(ids) == text


def test_exported_tokenizer_loads_from_out(tp1, tok, tmp_path, monkeypatch):
    """`AutoTokenizer.from_pretrained(OUT)` works without trust_remote_code (transformers asks about the model's
    remote code, gets no answer, reads the tokenizer files alone) and with it."""
    from transformers import AutoTokenizer

    out = export_hf(loaded(randomised(CASES["lt"], tok), tok), tmp_path / "out", log=lambda *_: None)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # a non-interactive session: no 15-second question
    for kw in ({}, {"trust_remote_code": True}):
        hf = AutoTokenizer.from_pretrained(out, **kw)
        assert hf.encode(TEXTS[6]) == tok.encode(TEXTS[6])
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_hf_kind_tokenizer_files_copied(tp1, tok, tmp_path):
    """A run with `tokenizer.kind: hf`: its Hugging Face tokenizer files are exported byte for byte (a chat
    template beside them too), and AutoTokenizer on OUT encodes as the run's tokenizer."""
    from transformers import AutoTokenizer

    from data_pipeline.tokenizer import load_hf_tokenizer

    src = tmp_path / "hf-tokenizer"
    src.mkdir()
    sentencepiece_to_hf(tok, src)  # any Hugging Face tokenizer directory will do: this one is at hand
    (src / "chat_template.jinja").write_text("{{ messages }}")
    (src / "tokenizer.model").write_bytes(b"not copied unless present: it is")
    hf_tok = load_hf_tokenizer(src)
    model = randomised(CASES["lt"], tok)
    run = loaded(model, hf_tok)
    run.cfg.tokenizer.kind = "hf"
    run.cfg.tokenizer.dir = str(src)
    out = export_hf(run, tmp_path / "out", log=lambda *_: None)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "tokenizer.model"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    hf = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert hf.encode(TEXTS[6]) == hf_tok.encode(TEXTS[6])
    assert json.loads((out / "loopstack_export.json").read_text())["tokenizer_sha256"] == hf_tok.sha256


def test_out_not_empty_refused_and_failure_leaves_nothing(tp1, tok, tmp_path, monkeypatch):
    model = randomised(CASES["lt"], tok)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError) as err:
        export_hf(loaded(model, tok), out)
    assert "\n" not in str(err.value) and str(out) in str(err.value)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    def broken(*_):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(export_mod, "write_tokenizer", broken)  # a failure after the weights were written
    with pytest.raises(RuntimeError, match="disk gone"):
        export_hf(loaded(model, tok), tmp_path / "new", log=lambda *_: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no OUT, no temporary directory


def test_bf16_export(tp1, tok, tmp_path):
    """--dtype bf16: bf16 weights and config dtype; the loaded model runs in bf16 and computes what loopstack's
    model cast to bf16 computes."""
    model = randomised(CASES["parcae"], tok)
    out = export_hf(loaded(model, tok), tmp_path / "out", dtype="bf16", log=lambda *_: None)
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    hf = load_hf(out)
    assert hf.dtype == torch.bfloat16
    tokens = torch.randint(0, tok.vocab_size, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = hf(tokens, use_cache=False).logits.float()
        want = model.to(torch.bfloat16)(tokens).logits.float()
    torch.testing.assert_close(got, want, rtol=0, atol=0.1)


def test_cli_export(tp1, tmp_path):
    """`loopstack export hf RUN OUT` in a subprocess on a run directory; the export's logits are load_run's;
    a second export to the same OUT is refused with one line."""
    from pretrain.inference import load_run
    from tests.use_helpers import make_run

    run = make_run(tmp_path, "parcae")
    out = tmp_path / "exported"
    cmd = [sys.executable, "-m", "loopstack.cli", "export", "hf", str(run), str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout and "trust_remote_code=True" in done.stdout
    record = json.loads((out / "loopstack_export.json").read_text())
    assert record["step"] == 0 and record["variant"] == "parcae" and record["source_run"] == str(run)

    ref = load_run(run, warn=lambda *_: None)
    tokens = torch.tensor([ref.tokenizer.encode("abc,de;f1=")])
    with torch.no_grad():
        torch.testing.assert_close(load_hf(out)(tokens).logits, ref.model(tokens).logits, rtol=0, atol=1e-5)

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert again.returncode == 2
    assert again.stderr.strip().count("\n") == 0 and "not an empty directory" in again.stderr
