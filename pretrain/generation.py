"""`loopstack generate`: complete prompts with a run's checkpoint (`pretrain.inference.load_run`, one process).

Prompts come from `--prompt` (repeatable) and `--prompt-file` (one prompt per line; a `.jsonl` file: one JSON
object per line with a `prompt` field, so prompts may hold newlines). They run in batches of `--batch-size`,
left-padded and masked (`pretrain.models.generate.generate_batch`), with the KV cache unless `--no-cache`. Each
completion is printed after its prompt (or, with `--json`, one JSON record per prompt with the text, the token
ids, and the loops each new token used); a summary line on stderr gives tokens/s and the mean loops per token.
`--kv-sharing` (Mixture-of-Recursions models only) generates with recursive KV sharing (pretrain/models/routing.py):
later loops attend to the first loop's keys/values.
Batch k (0-based, of size B) samples with seed `--seed` + k * B, so a prompt's draw does not depend on the others
in its batch only through their count.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from loopstack.errors import UserError


def read_prompts(prompts: list[str], prompt_file: str | None) -> list[str]:
    """The `--prompt` values, then the prompts of `--prompt-file`; one-line errors for an unreadable file or a
    bad JSONL line."""
    out = list(prompts)
    if prompt_file:
        path = Path(prompt_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"--prompt-file {path}: cannot read ({err})") from None
        if path.suffix == ".jsonl":
            for i, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as err:
                    raise UserError(f"{path}:{i}: not JSON ({err})") from None
                if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                    raise UserError(f"{path}:{i}: expected an object with a string `prompt` field")
                out.append(record["prompt"])
        else:
            out += [line for line in text.splitlines() if line.strip()]
    if not out:
        raise UserError("no prompt: give --prompt TEXT (repeatable) or --prompt-file FILE")
    return out


def check_args(args: argparse.Namespace) -> None:
    for flag, value, ok in (("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1),
                            ("--temperature", args.temperature, args.temperature >= 0),
                            ("--top-k", args.top_k, args.top_k >= 0),
                            ("--top-p", args.top_p, 0 < args.top_p <= 1),
                            ("--batch-size", args.batch_size, args.batch_size >= 1),
                            ("--loops", args.loops, args.loops is None or args.loops >= 1),
                            ("--exit-epsilon", args.exit_epsilon, args.exit_epsilon is None or args.exit_epsilon >= 0),
                            ("--exit-threshold", args.exit_threshold,
                             args.exit_threshold is None or 0 < args.exit_threshold <= 1)):
        if not ok:
            raise UserError(f"{flag} {value}: out of range (see loopstack generate --help)")
    if args.exit_epsilon is not None and args.exit_threshold is not None:
        raise UserError("--exit-epsilon and --exit-threshold: one exit rule at a time")


def check_kv_sharing_flag(model_cfg, loops: int) -> None:
    """`--kv-sharing` needs a Mixture-of-Recursions model (model.router) whose every token runs the first loop
    (expert choice: model.router_capacity[0] = 1); a one-line UserError otherwise."""
    from pretrain.models.routing import check_kv_sharing

    if model_cfg.router == "none":
        raise UserError("--kv-sharing: recursive KV sharing is for Mixture-of-Recursions models, and this run has "
                        "no router (model.router: none)")
    try:
        check_kv_sharing(model_cfg, loops)
    except ValueError as err:
        raise UserError(f"--kv-sharing: {err}") from None


def run_generate(args: argparse.Namespace) -> int:
    from pretrain.inference import load_run
    from pretrain.models.generate import check_positions, generate_batch

    check_args(args)
    texts = read_prompts(args.prompt, args.prompt_file)
    loaded = load_run(args.run, step=args.step, dtype=args.dtype, warn=lambda m: print(m, file=sys.stderr))
    tok, model = loaded.tokenizer, loaded.model
    loops = args.loops or loaded.cfg.model.loops
    if args.exit_threshold is not None:
        from pretrain.models.config import require_exit_gate

        require_exit_gate(loaded.cfg.model, loaded.run_dir)
    if args.kv_sharing:
        check_kv_sharing_flag(loaded.cfg.model, loops)
    print(f"generate: {loaded.info.path} (step {loaded.step}, {loaded.cfg.model.variant}, {loops} loops, "
          f"{next(model.parameters()).dtype}), {len(texts)} prompt(s)", file=sys.stderr)
    encoded = [tok.encode(t) for t in texts]  # once: checked here, then batched
    empty = [i for i, x in enumerate(encoded) if not x]
    if empty:
        raise UserError(f"prompt {empty[0] + 1} encodes to no tokens")
    try:  # every prompt, before any output (generate_batch checks each batch again)
        check_positions(model, max(map(len, encoded)), args.max_new_tokens)
    except ValueError as err:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: {err}") from None
    eos = tok.eos_id if tok.eos_id is not None and tok.eos_id >= 0 else None
    pad = tok.pad_id if tok.pad_id is not None and tok.pad_id >= 0 else 0
    n_new, n_loops, t_start = 0, 0, time.perf_counter()
    for first in range(0, len(texts), args.batch_size):
        batch, ids = texts[first:first + args.batch_size], encoded[first:first + args.batch_size]
        result = generate_batch(model, ids, args.max_new_tokens, loops=loops, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, seed=args.seed + first, eos_id=eos, pad_id=pad,
                                use_cache=not args.no_cache, exit_epsilon=args.exit_epsilon,
                                exit_threshold=args.exit_threshold, kv_sharing=args.kv_sharing)
        for i, text in enumerate(batch):
            new, used = result.tokens[i], result.loops_used[i]
            completion = tok.decode(new)
            n_new, n_loops = n_new + len(new), n_loops + sum(used)
            if args.json:
                print(json.dumps({"prompt": text, "completion": completion, "tokens": new, "loops": used,
                                  "eos": result.finished[i]}))
            else:
                print(f"{text}{completion}")
                if len(batch) > 1 or len(texts) > 1:
                    print("-" * 40)
        sys.stdout.flush()
    elapsed = time.perf_counter() - t_start
    mean_loops = n_loops / max(n_new, 1)
    print(f"generate: {n_new} new tokens in {elapsed:.2f} s ({n_new / max(elapsed, 1e-9):.1f} tokens/s), "
          f"{mean_loops:.2f} loops per token (of {loops})", file=sys.stderr)
    return 0
