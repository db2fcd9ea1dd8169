"""The read-ahead loader (`data.prefetch`, data_pipeline/prefetch.py): the same batches as the synchronous loader,
the same saved state at every step however far the reader got ahead, exact resumption, and a reader error raised by
the `next_batch()` that would have returned that batch."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.loader import PackedDataset
from data_pipeline.prefetch import Prefetcher

L = 32


def test_prefetched_batches_and_state_equal_the_synchronous_loader(prepared):
    sync = PackedDataset([prepared], L, micro_batch=3, dp_rank=1, dp_size=2, seed=5, document_masking=True)
    ahead = Prefetcher(PackedDataset([prepared], L, micro_batch=3, dp_rank=1, dp_size=2, seed=5,
                                     document_masking=True), depth=3, pin=False)
    for step in range(6):
        a, b = sync.next_batch(), ahead.next_batch()
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), step
        if step in (1, 4):  # saving while the reader is ahead: the consumed position, not the read one
            assert ahead.state_dict() == sync.state_dict()
    assert ahead.cursor == sync.cursor and ahead.epoch == sync.epoch and ahead.draws() == sync.draws()

    resumed = Prefetcher(PackedDataset([prepared], L, micro_batch=3, dp_rank=1, dp_size=2, seed=5,
                                       document_masking=True), depth=2, pin=False)
    resumed.load_state_dict(ahead.state_dict())
    for _ in range(3):
        a, b = sync.next_batch(), resumed.next_batch()
        assert np.array_equal(a["tokens"], b["tokens"])
    resumed.reset()
    assert resumed.cursor == 0
    resumed.close()
    ahead.close()


class _Failing:
    """A stand-in dataset whose third read fails (the prefetcher, not a dataset, is under test)."""

    global_batch = 1

    def __init__(self):
        self.cursor = 0

    def next_batch(self):
        if self.cursor == 2:
            raise OSError("shard-000002.arrow: damaged")
        self.cursor += 1
        return {"tokens": np.full((1, 4), self.cursor)}


def test_a_reader_error_is_raised_where_its_batch_was_due():
    loader = Prefetcher(_Failing(), depth=4, pin=False)
    assert loader.next_batch()["tokens"][0, 0] == 1
    assert loader.next_batch()["tokens"][0, 0] == 2
    with pytest.raises(OSError, match="damaged"):
        loader.next_batch()
    assert loader.cursor == 2
