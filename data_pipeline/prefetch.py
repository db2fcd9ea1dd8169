"""Batches read ahead in a background thread (`data.prefetch: N`), so the training step never waits on the disk.

The loader (`PackedDataset`) is a pure function of its cursor: the batch at global position c is the same whoever
reads it and when. `Prefetcher` runs one reader thread that owns the dataset and walks the cursor ahead of the
trainer, keeping up to N batches ready in a queue; the trainer's `next_batch()` takes the next one. What is saved
for resumption is the cursor of the batches the trainer has *consumed* (not of those read ahead), so a checkpoint
is the same with prefetching as without, and resuming is bit-identical. On a GPU machine the reader also copies
each batch into pinned (page-locked) host memory, and the trainer's copy to the device is then asynchronous
(`pretrain.batches.model_inputs` with non_blocking).

The thread reads only; everything that changes the cursor from outside (`load_state_dict`, `reset`) stops it first
and starts a fresh one from the new position. An error in the reader (a damaged shard) is raised by the
`next_batch()` that would have returned that batch, with its own message. N = 0 is the synchronous loader itself.
"""

from __future__ import annotations

import queue
import threading

import numpy as np
import torch

_STOP = object()


class Prefetcher:
    """`PackedDataset`'s interface (next_batch, state_dict, load_state_dict, reset, cursor, ...) with the reading
    done `depth` batches ahead in a thread; `pin` pins each batch's arrays (torch tensors then) for async copies."""

    def __init__(self, dataset, depth: int = 2, pin: bool | None = None):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.dataset, self.depth = dataset, depth
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._consumed = dataset.cursor  # the cursor after the batches handed out
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._halt = threading.Event()

    # --- the reader thread ----------------------------------------------------------------------------------

    def _start(self) -> None:
        self.dataset.cursor = self._consumed
        self._queue, self._halt = queue.Queue(maxsize=self.depth), threading.Event()
        self._thread = threading.Thread(target=self._read, args=(self._queue, self._halt), daemon=True,
                                        name="loopstack-prefetch")
        self._thread.start()

    def _read(self, out: queue.Queue, halt: threading.Event) -> None:
        while not halt.is_set():
            try:
                item = self._pinned(self.dataset.next_batch())
            except BaseException as err:  # handed to the consumer, raised there
                item = err
            while not halt.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def _pinned(self, batch: dict[str, np.ndarray]) -> dict:
        if not self.pin:
            return batch
        return {k: torch.from_numpy(v).pin_memory() for k, v in batch.items()}

    def close(self) -> None:
        """Stop the reader (it finishes the batch it is reading); the consumed position is kept."""
        if self._thread is not None:
            self._halt.set()
            self._thread.join()
            self._thread = None
        self.dataset.cursor = self._consumed

    # --- the loader interface -------------------------------------------------------------------------------

    def next_batch(self) -> dict:
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._thread.join()
            self._thread = None
            raise item
        self._consumed += self.dataset.global_batch
        return item

    def __iter__(self):
        while True:
            yield self.next_batch()

    @property
    def cursor(self) -> int:
        return self._consumed

    def draws(self, cursor: int | None = None) -> list[int]:
        return self.dataset.draws(self._consumed if cursor is None else cursor)

    @property
    def epoch(self) -> int:
        return self.dataset.epoch_at(self._consumed)

    def state_dict(self) -> dict:
        """The dataset's state at the consumed position (what the synchronous loader would save)."""
        running = self._thread is not None
        if running:
            self.close()
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.dataset.load_state_dict(state)
        self._consumed = self.dataset.cursor

    def reset(self) -> None:
        self.close()
        self.dataset.reset()
        self._consumed = self.dataset.cursor

    def __getattr__(self, name: str):  # sizes, epoch, draws, ...: the dataset's (its cursor is the consumed one)
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
