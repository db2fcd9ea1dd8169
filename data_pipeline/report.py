"""`loopstack data inspect`: what a prepared directory holds, readable at a glance."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from data_pipeline.shards import open_shard, read_manifest
from data_pipeline.tokenizer import load_tokenizer

MAX_SHARDS = 64  # the length histogram reads the offsets of at most this many shards, evenly spaced


def _histogram(lengths: np.ndarray, width: int = 40) -> list[str]:
    """Document lengths in power-of-two buckets, as text bars."""
    buckets = np.floor(np.log2(np.maximum(lengths, 1))).astype(np.int64)
    counts = np.bincount(buckets)
    top = counts.max()
    rows = []
    for b, c in enumerate(counts):
        if c:
            label = f"{1 << b:>9,}-{(1 << (b + 1)) - 1:<9,}"
            rows.append(f"  {label} {c:>10,} {'#' * max(1, round(width * c / top))}")
    return rows


def inspect(directory: str | os.PathLike, samples: int = 1, chars: int = 400, seed: int = 0) -> str:
    """Counts per source, the document-length histogram (tokens, EOS included) and decoded samples."""
    d = Path(directory)
    m = read_manifest(d)
    tok_dir = d / "tokenizer"
    lines = [f"{d}: {len(m['shards'])} shards, {m['documents']:,} documents, {m['tokens']:,} tokens "
             f"({m['dtype']}, {m.get('bytes', 0) / 1e6:.1f} MB), tokenizer {m['tokenizer']['sha256'][:12]} "
             f"(vocab {m['tokenizer']['vocab_size']})"]
    for s in m["sources"]:
        skipped = f", skipped {s['skipped']}" if s.get("skipped") else ""
        lines.append(f"  source {s['name']!r}: {s['documents']:,} documents, {s['tokens']:,} tokens{skipped}")
    if m.get("skipped_examples"):
        lines.append(f"  e.g. skipped {m['skipped_examples'][0]}")
    shards = m["shards"]
    step = max(1, -(-len(shards) // MAX_SHARDS))
    picked = shards[::step]
    lengths = [np.diff(b.column(0).offsets.to_numpy()) for s in picked for b in open_shard(d / s["file"])]
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    if len(lengths):
        scope = "" if len(picked) == len(shards) else f", from {len(picked)} of {len(shards)} shards"
        lines.append(f"document length (tokens{scope}): mean {lengths.mean():,.0f}, median "
                     f"{int(np.median(lengths)):,}, max {lengths.max():,}")
        lines += _histogram(lengths)
    tok = load_tokenizer(tok_dir, "auto") if (tok_dir / "tokenizer.json").is_file() else None
    rng = np.random.default_rng(seed)
    starts = np.cumsum([0] + [s["documents"] for s in m["shards"]])
    picks = rng.choice(m["documents"], size=min(samples, m["documents"]), replace=False) if m["documents"] else []
    for i in sorted(int(x) for x in picks):
        s = int(np.searchsorted(starts, i, side="right")) - 1
        row = i - starts[s]
        for batch in open_shard(d / m["shards"][s]["file"]):
            if row < batch.num_rows:
                ids = batch.column(0)[row].values.to_numpy()
                break
            row -= batch.num_rows
        text = tok.decode(ids) if tok else " ".join(map(str, ids[:200]))
        more = f" ... ({len(text) - chars:,} more characters)" if len(text) > chars else ""
        lines.append(f"--- document {i:,} ({m['shards'][s]['source']}, {len(ids):,} tokens) ---")
        lines.append(text[:chars] + more)
    return "\n".join(lines)
