"""Data pipeline: tokenizers, Arrow shards, packed resumable loader. Never imports torch.distributed."""
