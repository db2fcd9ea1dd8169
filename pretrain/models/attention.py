"""Attention kernels for packed documents: `model.attention: sdpa | flex`.

Packed training rows hold several documents (`doc_ids`, data_pipeline's loader); a token attends to the earlier
tokens of its own document only. The reference (`model.attention: sdpa`, the default) builds one dense boolean mask
[B, 1, T, T] per forward (`LoopedLM._context`) and hands it to `F.scaled_dot_product_attention` in every layer of
every loop. An explicit mask rules out the flash kernels, and every call reads the whole T x T mask.

`model.attention: flex` replaces it by FlexAttention: `document_block_mask(doc_ids)` builds ONE
`torch.nn.attention.flex_attention.BlockMask` per forward (a `mask_mod` closing over the doc ids: causal and same
document, block-sparse, so whole blocks across documents or above the diagonal are never computed), the forward's
context carries it in place of the dense mask, and every layer of every loop (prelude, core, coda; FLT queries from
another stream included, since only the key positions matter) passes it to `flex_attend`. The mathematics is that of
the dense path: the default scale 1/sqrt(head_dim), QK-norm and rotary applied before, GQA through `enable_gqa`.

Where flex does not apply, `LoopedLM._context` keeps the dense/causal path (the same numbers, documented there):
no doc_ids (plain causal attention: SDPA's `is_causal`, flash on CUDA already), padded inference prompts
(`attention_mask`), KV-cache decoding (not with doc_ids anyway), and Mixture-of-Recursions routing (routing.py
gathers subsets of the dense mask's rows).

How `flex_attend` runs (torch 2.13):
- CUDA: `torch.compile(flex_attention)` (one cached compiled function; FlexAttention is meant to be compiled, eager
  materialises the scores), fused forward and backward kernels. Inside an already compiled region
  (`train.compile`) the plain function is called and dynamo inlines it.
- CPU without gradient (eval, generation without cache): the public `flex_attention`, eager (an unfused
  implementation that materialises the scores: as costly as the dense path; compiling it on CPU costs seconds per
  shape for a forward-only gain); inside `train.compile` inductor's CPU template.
- CPU with gradient: torch 2.13's `flex_attention` refuses ("does not support backward on CPU"). Training on CPU
  then calls the FlexAttention higher-order op directly, eagerly: its own autograd function with its dense reference
  forward and backward (what flex_attention runs in its debug mode), same block mask and mask_mod. It is flex's
  mathematics, not a fast kernel: it keeps CPU training and the tests on the flex code path, and no faster than sdpa.

The block mask is built with `create_block_mask` (vmap over the mask_mod, O(B T^2) booleans once per forward instead
of once per layer call); its block size is FlexAttention's default (128).
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from loopstack.errors import ConfigError

# eager flex_attention warns once that it is unfused; on CPU eager is the chosen path (module docstring)
warnings.filterwarnings("ignore", message="flex_attention called without torch.compile", category=UserWarning)

__all__ = ["BlockMask", "document_block_mask", "flex_attend", "is_block_mask"]


def document_mask_mod(doc_ids: torch.Tensor):
    """The mask_mod of packed documents: query q of row b may read key k iff k <= q and both lie in one document.
    Closes over `doc_ids` [B, T] (integer ids, equal within a document)."""

    def doc_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    return doc_causal


def document_block_mask(doc_ids: torch.Tensor) -> BlockMask:
    """The block mask of one forward: causal within each document of each row of `doc_ids` [B, T], shared by every
    head (H = None broadcasts) and by every layer of every loop. Built on doc_ids' device."""
    if doc_ids.dim() != 2:
        raise ValueError(f"doc_ids must be [batch, seq], got shape {tuple(doc_ids.shape)}")
    B, T = doc_ids.shape
    return create_block_mask(document_mask_mod(doc_ids), B, None, T, T, device=doc_ids.device)


def is_block_mask(mask) -> bool:
    """Whether an attention mask is a FlexAttention block mask (else a dense boolean tensor or None)."""
    return isinstance(mask, BlockMask)


@functools.cache
def _compiled_flex():
    """flex_attention compiled once per process (shapes specialise inside dynamo's cache): the CUDA path."""
    return torch.compile(flex_attention, dynamic=False)


@torch.compiler.disable  # inductor has no CPU lowering of flex's backward: a graph break, run eagerly
def _flex_with_grad_on_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask,
                           enable_gqa: bool) -> torch.Tensor:
    """FlexAttention's higher-order op called eagerly: the path the public function refuses on CPU when gradients
    are needed. Its autograd function runs flex's dense reference forward and backward (see the module docstring)."""
    try:
        from torch._higher_order_ops.flex_attention import flex_attention as flex_hop
        from torch.nn.attention.flex_attention import _apply_kernel_options, _identity
    except ImportError as err:  # private torch API (2.13): a clear refusal rather than a traceback deep inside
        raise ConfigError("model.attention = flex trains on CPU through FlexAttention's higher-order op, which this "
                          f"torch ({torch.__version__}) lacks: train with model.attention = sdpa on CPU") from err
    if q.shape[1] != k.shape[1] and not enable_gqa:
        raise ValueError(f"{q.shape[1]} query heads on {k.shape[1]} key/value heads need enable_gqa")
    options = _apply_kernel_options(q, k, v, False, None)  # the op handles GQA itself (Hq a multiple of Hkv)
    return flex_hop(q, k, v, _identity, block_mask.as_tuple(), q.shape[-1] ** -0.5, options)[0]


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask,
                enable_gqa: bool = False) -> torch.Tensor:
    """Attention of q [B, Hq, T, hd] on k, v [B, Hkv, T, hd] under `block_mask`, with flex_attention's default scale
    1/sqrt(hd) (SDPA's): compiled on CUDA, eager on CPU, the higher-order op for CPU training (module docstring)."""
    if q.device.type == "cpu":
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return _flex_with_grad_on_cpu(q, k, v, block_mask, enable_gqa)
        # no graph is built: detached, so that the CPU check on requires_grad passes leaves under no_grad too
        return flex_attention(q.detach(), k.detach(), v.detach(), block_mask=block_mask, enable_gqa=enable_gqa)
    if torch.compiler.is_compiling():  # inside train.compile's graph: dynamo inlines it
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    return _compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
