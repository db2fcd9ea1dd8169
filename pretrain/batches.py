"""From a loader batch to the model's inputs: the one path training, evaluation and benchmarks share.

A loader batch (`data_pipeline.loader.PackedDataset.next_batch`) holds `tokens` [B, L + 1] and, with
`data.document_masking`, `doc_ids` [B, L + 1]. The model reads inputs tokens[:, :-1], predicts labels
tokens[:, 1:], and, when the batch has doc_ids, attends only within a document (doc_ids of the input positions).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


class ModelInputs(NamedTuple):
    inputs: torch.Tensor  # [B, L] token ids
    labels: torch.Tensor  # [B, L] next-token targets
    doc_ids: torch.Tensor | None  # [B, L] document index of each input position; None = no document masking


def model_inputs(batch: dict[str, np.ndarray | torch.Tensor], device: torch.device | str) -> ModelInputs:
    """`batch` (numpy from the loader, or pinned tensors from `data_pipeline.prefetch.Prefetcher`, copied to the
    device asynchronously) as model inputs on `device`: model(x.inputs, x.labels, doc_ids=x.doc_ids)."""
    tokens = _on(batch["tokens"], device)
    doc_ids = _on(batch["doc_ids"], device)[:, :-1] if "doc_ids" in batch else None
    return ModelInputs(tokens[:, :-1], tokens[:, 1:], doc_ids)


def _on(x: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(x)
    return t.to(device, non_blocking=t.is_pinned())
