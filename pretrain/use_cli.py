"""Using a trained model: `loopstack generate`, `loopstack export hf`, `loopstack convert hf`, `loopstack harness`
(argparse only at import time: torch, transformers and lm-eval load inside the handlers).

RUN is a run directory (its newest complete checkpoint, or `--step N`) or one checkpoint directory
(`<run>/checkpoints/<step>`); `pretrain.inference.load_run` builds the model from it in one process.
"""

from __future__ import annotations

import argparse


def _loop_list(text: str) -> list[int]:
    """`--loops` as an argparse type: `loopstack.commands.parse_loop_list`, its refusal as argparse's one line."""
    from loopstack.commands import parse_loop_list
    from loopstack.errors import UserError

    try:
        return parse_loop_list(text)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="a run directory, or one checkpoint directory <run>/checkpoints/<step>")
    p.add_argument("--step", type=int, default=None, help="the checkpoint of this step (default: the newest)")


def register(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="complete prompts with a trained model (batched, KV-cached)",
                         description="Complete prompts with a run's checkpoint in one process. Prompts of "
                                     "different lengths are batched (left-padded, masked). --temperature 0 is "
                                     "greedy and deterministic.")
    _add_source(gen)
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    gen.add_argument("--prompt-file", default=None, help="a file of prompts: one per line, or a .jsonl with "
                                                         "a `prompt` field per line")
    gen.add_argument("--loops", type=int, default=None, help="loop count (default: the trained one)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = off")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = off")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--exit-epsilon", type=float, default=None,
                     help="per token: stop looping once the state's relative change falls below this")
    gen.add_argument("--exit-threshold", type=float, default=None,
                     help="models with a learned exit gate (model.exit_gate): per token, stop looping once the "
                          "cumulative exit probability reaches this (0 < q <= 1; 1 = every loop)")
    gen.add_argument("--kv-sharing", action="store_true",
                     help="Mixture-of-Recursions models (model.router): recursive KV sharing, every later loop "
                          "attends to the first loop's keys/values (1/N of the core's cache memory; a different "
                          "model semantics than the default recursion-wise cache)")
    gen.add_argument("--batch-size", type=int, default=16, help="prompts per batch")
    gen.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    gen.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: the run's")
    gen.add_argument("--json", action="store_true", help="one JSON record per prompt instead of text")
    gen.set_defaults(func=_generate)

    exp = sub.add_parser("export", help="export a run's checkpoint (Hugging Face format)")
    exp_sub = exp.add_subparsers(dest="export_format", metavar="FORMAT", required=True)
    hf = exp_sub.add_parser("hf", help="config.json + safetensors + modelling code + tokenizer for transformers "
                                       "(AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True))")
    _add_source(hf)
    hf.add_argument("out", metavar="OUT", help="output directory (created; must be empty if it exists)")
    hf.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    hf.set_defaults(func=_export_hf)

    conv = sub.add_parser("convert", help="turn a pretrained checkpoint into a loopstack run to generate with, "
                                          "evaluate, export or uptrain")
    conv_sub = conv.add_subparsers(dest="convert_format", metavar="FORMAT", required=True)
    chf = conv_sub.add_parser("hf", help="a local Llama-, Qwen2/Qwen3-style Hugging Face checkpoint directory")
    chf.add_argument("src", metavar="SRC", help="local directory with config.json, *.safetensors and a tokenizer")
    chf.add_argument("out", metavar="OUT", help="the loopstack run directory to write")
    chf.add_argument("--n-core", type=int, required=True, help="layers in the looped core block")
    chf.add_argument("--n-prelude", type=int, default=None,
                     help="layers before the loop, from the first source layers (default: 0)")
    chf.add_argument("--n-coda", type=int, default=None,
                     help="layers after the loop, from the last source layers (default: 0)")
    chf.add_argument("--loops", type=int, default=None,
                     help="loop count (default: the middle layers / n-core)")
    chf.add_argument("--init", choices=("average", "select", "stepwise"), default="stepwise",
                     help="core weights from the middle layers: their average, the first group, or evenly spaced "
                          "middle layers with the first and last kept (Relaxed Recursive Transformers' stepwise)")
    chf.add_argument("--loop-lora-rank", type=int, default=0,
                     help="per-loop LoRA initialised by truncated SVD of each layer's difference to the shared one")
    chf.set_defaults(func=_convert_hf)

    har = sub.add_parser("harness", help="downstream tasks with lm-evaluation-harness, at several loop counts",
                         description="Run lm-evaluation-harness tasks on a run's checkpoint at each loop count; "
                                     "writes <run>/harness/step_<N>.json (and latest.json) and step_<N>.png, each "
                                     "task's main metric vs loops. "
                                     "Needs the `lm-eval` package (pip install lm-eval).")
    _add_source(har)
    har.add_argument("--tasks", required=True, help="comma-separated task names")
    har.add_argument("--include-path", default=None, help="a directory of task YAMLs (local tasks)")
    har.add_argument("--loops", type=_loop_list, default=None, help="comma-separated loop counts "
                                                                    "(default: the trained one)")
    har.add_argument("--limit", type=int, default=None, help="at most N documents per task")
    har.add_argument("--batch-size", type=int, default=8)
    har.add_argument("--out", default=None, help="output directory (default: <run>/harness)")
    har.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: the run's")
    har.set_defaults(func=_harness)


def _generate(args: argparse.Namespace) -> int:
    from pretrain.generation import run_generate

    return run_generate(args)


def _export_hf(args: argparse.Namespace) -> int:
    from pretrain.hf.export import run_export

    return run_export(args)


def _convert_hf(args: argparse.Namespace) -> int:
    from pretrain.hf.convert import run_convert

    return run_convert(args)


def _harness(args: argparse.Namespace) -> int:
    from pretrain.harness import run_harness

    return run_harness(args)
