"""`loopstack export hf RUN OUT [--step N] [--dtype fp32|bf16]`: a run's checkpoint as a Hugging Face transformers
model directory, loadable with

    AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)            # loops=8 to run another depth
    AutoTokenizer.from_pretrained(OUT)

OUT holds:

    config.json               `LoopstackConfig` (configuration_loopstack.py): the model section with every loop
                              switch resolved, padded and real vocabulary, LoRA bank, noise seed, special ids,
                              auto_map (AutoConfig, AutoModelForCausalLM -> the two files below)
    model.safetensors         loopstack's TP=1 state dict as it is (tensors only; megatron's `_extra_state` entries
                              dropped), in fp32 or bf16: the HF model keeps loopstack's parameter names
    configuration_loopstack.py, modeling_loopstack.py
                              the modelling code (trust_remote_code): a plain torch re-implementation of LoopedLM's
                              inference forward, importing only torch and transformers
    generation_config.json    bos / eos / pad ids
    tokenizer.json, tokenizer_config.json
                              sentencepiece runs: the model converted to a `tokenizers` tokenizer that encodes and
                              decodes as `Tokenizer.encode` / `decode` (no BOS added, no prefix space, special-token
                              text is text: `split_special_tokens`); checked on a probe text before anything is
                              kept. Runs with `tokenizer.kind: hf`: that tokenizer's files, copied as they are.
                              (loopstack's own sidecar, also named tokenizer.json, is never copied.)
    loopstack_export.json     where it came from: run, checkpoint step, loopstack version, variant, dtype
    README.md                 how to load it

How the export proves itself: the weights are loaded strictly (`load_state_dict(strict=True)`) into the HF model
class before it is saved, so a parameter the modelling code lacks, or one it has and loopstack does not, stops the
export. tests/hf/test_export.py compares logits (1e-5, fp32) and greedy generations with loopstack's for every
variant.

Atomicity: everything is written to a temporary directory next to OUT and renamed to OUT at the end; a failed export
leaves nothing (OUT must not exist, or be an empty directory).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from loopstack.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# what a Hugging Face tokenizer directory may hold (tokenizer.kind: hf); copied when present
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                      "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                      "chat_template.json")
# the export's tokenizer self-check: code with tabs, runs of spaces, newlines, non-ASCII and special-token text
PROBE = ("def f(x):\n\treturn  x   +\t1  # héllo wörld — 日本語 ✓ 😀\n\n\n    if a, b; c = 0:\n"
         "<s> </s> <unk> <pad> <0x41> \u2581 abc,12;=x")
# a unigram piece that text must never produce (control, unknown, byte pieces) gets this score (see `_unigram_fix`)
NEVER_SCORE = -1e6


def run_export(args) -> int:
    """The CLI handler: load the checkpoint (args.run, args.step), export it to args.out in args.dtype."""
    from pretrain.inference import load_run

    out = Path(args.out)
    _check_out(out)  # before loading a large model
    print(f"export hf: loading {args.run}" + (f" (step {args.step})" if args.step is not None else ""), flush=True)
    loaded = load_run(args.run, step=args.step, dtype=args.dtype, device="cpu")
    path = export_hf(loaded, out, dtype=args.dtype)
    print(f"export hf: wrote {path} (step {loaded.info.step}, {loaded.cfg.model.variant}, {args.dtype})")
    print("load it with:")
    print("  from transformers import AutoModelForCausalLM, AutoTokenizer; "
          f"model = AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True); "
          f"tokenizer = AutoTokenizer.from_pretrained({str(path)!r}, trust_remote_code=True)")
    return 0


def export_hf(loaded, out: str | os.PathLike, dtype: str = "fp32", log=print) -> Path:
    """Write `loaded` (a `pretrain.inference.Loaded`: model at TP=1, cfg, tokenizer, info, run_dir) as a Hugging
    Face model directory `out` in `dtype` (fp32 | bf16); returns its path. See the module docstring."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if loaded.cfg.model.router != "none":
        raise UserError(f"{loaded.info.path}: model.router = {loaded.cfg.model.router} (Mixture-of-Recursions) is not "
                        "in the exported modelling code, which runs every token through every loop; export hf "
                        "supports unrouted models")
    out = Path(out)
    _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        config = hf_config(loaded, dtype)
        log(f"export hf: {config.variant}, d_model {config.d_model}, {config.n_prelude}+{config.n_core}x"
            f"{config.loops}+{config.n_coda} layers, {dtype}")
        _save_model(loaded.model, config, dtype, tmp)
        log(f"export hf: tokenizer ({_tokenizer_kind(loaded)})")
        write_tokenizer(loaded, tmp)
        _write_provenance(loaded, config, dtype, tmp)
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():  # transformers writes the weights through a private temporary file
            f.chmod(0o666 & ~umask)
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty directory; export hf writes a new directory "
                        "(remove it or choose another OUT)")


# --- the model ---------------------------------------------------------------------------------------------------

def hf_config(loaded, dtype: str = "fp32"):
    """The `LoopstackConfig` of a loaded model: its model section with the switches resolved."""
    from pretrain.hf.configuration_loopstack import LoopstackConfig
    from pretrain.models.config import lora_targets, mlp_hidden

    model, tok = loaded.model, loaded.tokenizer
    cfg, sw = model.cfg, model.switches
    bank = 0
    if model.loop_lora is not None:  # the bank size is the A banks' first dim (config.lora_bank at build)
        bank = int(next(iter(model.loop_lora[0].values())).A.shape[0])
    rank = cfg.loop_lora_rank
    alpha = rank if cfg.loop_lora_alpha is None else cfg.loop_lora_alpha

    def special(value: int) -> int | None:
        return None if value is None or value < 0 else int(value)

    return LoopstackConfig(
        variant=cfg.variant, vocab_size=int(model.embed.weight.shape[0]), tokenizer_vocab_size=model.vocab_size,
        d_model=cfg.d_model, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads or cfg.n_heads,
        n_prelude=cfg.n_prelude, n_core=cfg.n_core, n_coda=cfg.n_coda, loops=cfg.loops, mlp=cfg.mlp,
        mlp_hidden=mlp_hidden(cfg), qkv_bias=cfg.qkv_bias, proj_bias=cfg.proj_bias, norm_kind=cfg.norm_kind,
        position=cfg.position, max_positions=cfg.max_positions, qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps,
        tie_embeddings=cfg.tie_embeddings, logit_softcap=cfg.logit_softcap, rope_theta=cfg.rope_theta,
        init_std=cfg.init_std, injection=sw.injection, entry_norm=sw.entry_norm, internal_recall=sw.internal_recall,
        restart=sw.restart, state_inject=sw.state_inject, norm=sw.norm, outer_norm=sw.outer_norm,
        norm_affine=sw.norm_affine, state_init=sw.state_init, state_init_std=sw.state_init_std,
        embed_scale=sw.embed_scale, loop_lora_rank=rank, loop_lora_scale=(alpha / rank) if rank else 1.0,
        loop_lora_targets=list(lora_targets(cfg)), loop_lora_bank=bank, noise_seed=int(model._noise_seed),
        exit_gate=model.exit_gate is not None,
        bos_token_id=special(tok.bos_id), eos_token_id=special(tok.eos_id), pad_token_id=special(tok.pad_id),
        dtype="float32" if dtype == "fp32" else "bfloat16")


def _save_model(model, config, dtype: str, out: Path) -> None:
    """Load loopstack's state dict strictly into the HF model class (on the meta device, sharing the tensors) and
    let transformers save it: config.json with auto_map, model.safetensors, generation_config.json, the code."""
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    from pretrain.hf.modeling_loopstack import LoopstackForCausalLM

    state = {name: t.detach().to(device="cpu", dtype=DTYPES[dtype]).contiguous()
             for name, t in model.state_dict().items() if isinstance(t, torch.Tensor)}
    with torch.device("meta"):
        hf = LoopstackForCausalLM(config)
    result = hf.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:  # the modelling code is out of step with loopstack's model
        raise RuntimeError(f"export hf: the HF model's parameters differ from loopstack's: missing "
                           f"{result.missing_keys}, unexpected {result.unexpected_keys}")
    hf.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                            pad_token_id=config.pad_token_id)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one file: no "Writing model shards" bar in the export's output
    try:
        hf.save_pretrained(out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


# --- the tokenizer -----------------------------------------------------------------------------------------------

def _tokenizer_kind(loaded) -> str:
    return getattr(loaded.cfg.tokenizer, "kind", "sentencepiece")


def write_tokenizer(loaded, out: Path) -> None:
    """The run's tokenizer as a Hugging Face tokenizer in `out` (see the module docstring)."""
    if _tokenizer_kind(loaded) == "hf":
        _copy_hf_tokenizer(loaded, out)
    else:
        sentencepiece_to_hf(loaded.tokenizer, out)


def _copy_hf_tokenizer(loaded, out: Path) -> None:
    tok = loaded.tokenizer
    src = Path(tok.path) if getattr(tok, "path", None) else Path(loaded.cfg.tokenizer.dir)
    src = src.parent if src.is_file() else src
    for name, data in getattr(tok, "files", {}).items():  # the files that define it, as loaded
        (out / name).write_bytes(data)
    for name in HF_TOKENIZER_FILES:
        if (src / name).is_file() and not (out / name).exists():
            shutil.copyfile(src / name, out / name)
    if not (out / "tokenizer.json").is_file():
        raise UserError(f"{src}: no Hugging Face tokenizer.json to export (tokenizer.kind: hf)")


def sentencepiece_to_hf(tokenizer, out: Path) -> None:
    """Convert a sentencepiece `Tokenizer` to tokenizer.json + tokenizer_config.json in `out` (transformers'
    converter, reading the model's own normaliser settings: no dummy prefix, whitespace kept), then check the
    result on `PROBE` against the sentencepiece model; a mismatch is a UserError and nothing is exported."""
    import tempfile

    from transformers import AutoTokenizer

    sp = tokenizer.sp
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(tokenizer.model_bytes)
        (Path(tmp) / "tokenizer_config.json").write_text("{}")
        converted = AutoTokenizer.from_pretrained(tmp)
    spec = json.loads(converted.backend_tokenizer.to_str())
    if spec.get("model", {}).get("type") == "Unigram":
        _unigram_fix(spec, sp)
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else None

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": piece(tokenizer.bos_id),
              "eos_token": piece(tokenizer.eos_id), "unk_token": piece(tokenizer.unk_id),
              "pad_token": piece(tokenizer.pad_id), "add_bos_token": False, "add_eos_token": False,
              "split_special_tokens": True, "clean_up_tokenization_spaces": False,
              "model_max_length": 1_000_000_000_000_000_019_884_624_838_656}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    _check_tokenizer(tokenizer, out)


def _unigram_fix(spec: dict, sp) -> None:
    """sentencepiece's unigram lattice never produces control, unknown or byte pieces from text ("<s>", "<0x41>"
    typed in a document are characters); the `tokenizers` Unigram model matches every vocabulary entry. Give those
    pieces a score no segmentation picks (the unknown-character score moves with the minimum, equally for every
    segmentation of a text, so nothing else changes)."""
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab)):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i):
            vocab[i][1] = NEVER_SCORE


def _check_tokenizer(tokenizer, out: Path) -> None:
    """Load the written tokenizer files alone (a directory without the model's config.json, whose auto_map would
    ask about remote code) and compare with sentencepiece on the probe."""
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(out / name, Path(tmp) / name)
        hf = AutoTokenizer.from_pretrained(tmp)
    for text in (PROBE, *PROBE.split("\n")):
        ids = tokenizer.encode(text)
        got = hf.encode(text, add_special_tokens=False)
        if got != ids:
            raise UserError(f"{tokenizer.path or 'tokenizer'}: its Hugging Face conversion encodes {text[:40]!r} as "
                            f"{got[:12]}, sentencepiece as {ids[:12]}; cannot export this tokenizer")
        if tokenizer.unk_id not in ids and hf.decode(ids) != tokenizer.decode(ids):
            raise UserError(f"{tokenizer.path or 'tokenizer'}: its Hugging Face conversion decodes {text[:40]!r} "
                            "differently from sentencepiece; cannot export this tokenizer")


# --- provenance --------------------------------------------------------------------------------------------------

def _write_provenance(loaded, config, dtype: str, out: Path) -> None:
    from loopstack import __version__

    info = getattr(loaded, "info", None)
    record = {
        "source_run": str(loaded.run_dir) if getattr(loaded, "run_dir", None) is not None else None,
        "checkpoint": str(info.path) if info is not None else None,
        "step": info.step if info is not None else None,
        "loopstack_version": __version__,
        "variant": config.variant,
        "loops": config.loops,
        "dtype": dtype,
        "tokenizer_sha256": getattr(loaded.tokenizer, "sha256", None),
    }
    (out / "loopstack_export.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "README.md").write_text(
        f"# loopstack export: {config.variant}\n\n"
        f"A looped transformer ({config.n_prelude} prelude + {config.n_core} core layers x {config.loops} loops + "
        f"{config.n_coda} coda layers, d_model {config.d_model}) exported by `loopstack export hf` "
        f"(see loopstack_export.json for its run and step).\n\n"
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)  # loops=N: another depth\n"
        "tokenizer = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)  # the flag only skips a question\n"
        "```\n")
