"""`loopstack data ...`: train-tokenizer, prepare, merge, verify, inspect, synth.

Every flag can also come from a run config (`--config FILE`, `--set key=value`); flags win. Only
argparse at import time: the work modules are imported inside the handlers.

    loopstack data train-tokenizer --source stdlib --vocab-size 4096 --out data/tok
    loopstack data prepare --source stdlib --tokenizer data/tok --out data/shards [--workers N]
    loopstack data prepare --config configs/quickstart.yaml --slice 3/8     # one task of a job array
    loopstack data merge data/shards                                        # after all slices
    loopstack data verify data/shards
    loopstack data inspect data/shards
    loopstack data synth --task khop --out data/khop --train-depth 4 --eval-depth 8
    loopstack data synth --task chain --out data/chain --train-depth 4 --eval-depth 12
"""

from __future__ import annotations

import argparse

from data_pipeline import SYNTH_TASKS
from loopstack.commands import add_set_flag


def _config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML run config to read data/tokenizer settings from")
    add_set_flag(p)


def _source_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", action="append", default=None, metavar="SPEC",
                   help="[NAME=]PATH|GLOB|stdlib[:GLOB]|hf:PATH[@SPLIT][#FIELD] (repeatable; default data.sources)")
    p.add_argument("--text-field", default=None, help="field holding the text in jsonl/parquet/datasets")


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="tokenizers, shards and synthetic tasks",
                          description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    p = dsub.add_parser("train-tokenizer", help="train a sentencepiece tokenizer on sources")
    _source_flags(p)
    p.add_argument("--vocab-size", type=int, default=None, help="vocabulary size (default tokenizer.vocab_size)")
    p.add_argument("--model-type", choices=["bpe", "unigram"], default=None)
    p.add_argument("--max-sentences", type=int, default=None, help="cap on sampled training sentences")
    p.add_argument("--out", default=None, help="output directory (default tokenizer.dir)")
    _config_flags(p)
    p.set_defaults(func=_train_tokenizer)

    p = dsub.add_parser("prepare", help="tokenize sources into checksummed Arrow shards (resumable)")
    _source_flags(p)
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default tokenizer.dir)")
    p.add_argument("--out", default=None, help="output directory (default data.out)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default data.workers; 0 = all cores)")
    p.add_argument("--shard-mb", type=float, default=None, help="shard size bound in MiB (default data.shard_mb)")
    p.add_argument("--max-doc-mb", type=float, default=None, help="larger documents are bad documents")
    p.add_argument("--bad-documents", choices=["skip", "error"], default=None,
                   help="skip and count empty/non-UTF-8/oversized documents, or stop at the first")
    p.add_argument("--slice", default=None, metavar="I/N",
                   help="only slice I of N (0-based) of the units, for job arrays; then `data merge`")
    _config_flags(p)
    p.set_defaults(func=_prepare)

    p = dsub.add_parser("merge", help="combine the slice manifests of a --slice job array into manifest.json")
    p.add_argument("dir")
    p.set_defaults(func=_merge)

    p = dsub.add_parser("verify", help="check every shard's size, sha256 and counts against the manifest")
    p.add_argument("dir")
    p.set_defaults(func=_verify)

    p = dsub.add_parser("inspect", help="counts, document-length histogram and a decoded sample")
    p.add_argument("dir")
    p.add_argument("--samples", type=int, default=1, help="decoded documents to show")
    p.add_argument("--chars", type=int, default=400, help="characters shown per sample")
    p.add_argument("--seed", type=int, default=0, help="which documents are sampled")
    p.set_defaults(func=_inspect)

    p = dsub.add_parser("synth", help="synthetic reasoning tasks (k-hop, prefix sums, parity, pointer chains) "
                                      "as shards")
    p.add_argument("--task", required=True, choices=SYNTH_TASKS)
    p.add_argument("--out", required=True, help="writes OUT/tokenizer, OUT/train, OUT/eval")
    p.add_argument("--train-depth", type=int, default=4, help="train on depths 1..D")
    p.add_argument("--eval-depth", type=int, default=8, help="eval on depths D+1..this")
    p.add_argument("--train-docs", type=int, default=20000)
    p.add_argument("--eval-docs", type=int, default=500, help="documents per eval depth")
    p.add_argument("--size", type=int, default=0,
                   help="khop: letters (16); prefix_sum: digits (16); chain: letters (eval depth + 9, at most 26; "
                        "allowed eval depth + 5 .. 26)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_synth)


def _resolve(args: argparse.Namespace):
    """The run config with the command's flags applied on top (flags win)."""
    from pretrain.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.source:
        cfg.data.sources = list(args.source)
    if args.text_field:
        cfg.data.text_field = args.text_field
    return cfg


def _train_tokenizer(args: argparse.Namespace) -> int:
    from data_pipeline.prepare import train_tokenizer_from_config

    cfg = _resolve(args)
    for flag, key in (("vocab_size", "vocab_size"), ("model_type", "model_type"), ("max_sentences", "max_sentences"),
                      ("out", "dir")):
        if getattr(args, flag) is not None:
            setattr(cfg.tokenizer, key, getattr(args, flag))
    train_tokenizer_from_config(cfg.data, cfg.tokenizer)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from data_pipeline.prepare import parse_slice, prepare_from_config

    cfg = _resolve(args)
    if args.tokenizer is not None:
        cfg.tokenizer.dir = args.tokenizer
    for flag in ("out", "workers", "shard_mb", "max_doc_mb", "bad_documents"):
        if getattr(args, flag) is not None:
            setattr(cfg.data, flag, getattr(args, flag))
    prepare_from_config(cfg.data, cfg.tokenizer, slice=parse_slice(args.slice))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from data_pipeline.prepare import merge

    merge(args.dir)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from data_pipeline.shards import verify

    m = verify(args.dir)
    print(f"{args.dir}: ok ({len(m['shards'])} shards, {m['documents']:,} documents, {m['tokens']:,} tokens, "
          f"sha256 of every shard checked)")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from data_pipeline.report import inspect

    print(inspect(args.dir, samples=args.samples, chars=args.chars, seed=args.seed))
    return 0


def _synth(args: argparse.Namespace) -> int:
    from data_pipeline.synth import synthesize

    synthesize(args.task, args.out, train_depth=args.train_depth, eval_depth=args.eval_depth,
               train_docs=args.train_docs, eval_docs=args.eval_docs, size=args.size, seed=args.seed)
    return 0
