"""Data pipeline: tokenizers, Arrow shards, packed resumable loader. Never imports torch.distributed.

    sources.py    source specs (files, folders, globs, jsonl[.gz|.zst], parquet, HF datasets, `stdlib`),
                  the work plan (units) and streaming readers
    tokenizer.py  sentencepiece training/loading; a tokenizer is named by the sha256 of its .model
    shards.py     the Arrow shard format, manifest, integrity checks (`data verify`)
    encode.py     what a prepare worker does with one unit (read, encode, write shard + receipt)
    prepare.py    parallel, deterministic, resumable tokenization; SLURM slices + merge; ensure_dataset
    loader.py     PackedDataset: packed, mixed, shuffled, DP-split, resumable (numpy only)
    synth.py      synthetic reasoning tasks (k-hop, prefix sums, parity, pointer chains) with a depth split
    report.py     `data inspect`
    cli.py        `loopstack data ...`
"""

# The tasks of `data_pipeline.synth`, here so the CLIs can offer them without importing the work modules.
# Append only: a task's index in this tuple seeds its generator (synth.generate).
SYNTH_TASKS = ("khop", "prefix_sum", "parity", "chain")
