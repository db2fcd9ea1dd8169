"""The training loader: packed sequences from memory-mapped shards, mixed, shuffled, split over DP ranks.

Numpy only (no torch): the trainer wraps the arrays. The design, in four maps:

1. **Packing.** A manifest's documents (each ends with EOS) form one token stream of T tokens. Sample
   i is the window `stream[i*L : i*L + L + 1]` (L = seq_len): inputs and shifted targets in one row,
   no padding, every token a target exactly once per epoch. n = (T - 1) // L samples.
2. **Held-out split.** With `eval_fraction` f > 0 the samples are cut into blocks of B (1..64) and
   round(f * blocks) evenly spaced blocks are held out: `split="eval"` reads only those, `"train"`
   only the others. Deterministic, disjoint, spread over the whole corpus, independent of the seed.
   With f = 0 a split is the whole manifest (a dedicated eval directory).
3. **Mixture.** Global position q (0, 1, 2, ...) goes to a manifest by a closed form: manifest 0 takes
   position r of the stream when floor(w0*(r+1)) > floor(w0*r), the rest cascade to manifest 1 with
   its share of what remains, and so on (exact rationals). Shares are exact at every prefix (within
   one sample) and manifest m's draw count at q is computable directly. Default weights are the
   manifests' sizes, so one pass over everything is one epoch of each.
4. **Shuffle.** Manifest m's k-th draw is sample perm(k mod n) of epoch k // n, perm a keyed Feistel
   bijection of [0, n) seeded by (seed, m, epoch, split): a fresh order every epoch, no permutation
   table in memory (memory stays flat whatever the corpus size).

DP: one global cursor advances by micro_batch * dp_size per `next_batch`; rank r takes positions
[cursor + r*micro_batch, cursor + (r+1)*micro_batch). The state (the cursor) is identical on every
rank, so resuming with another dp_size continues the same global sequence without repeats or skips.
"""

from __future__ import annotations

import bisect
import functools
import math
import resource
from collections import OrderedDict
from fractions import Fraction
from pathlib import Path

import numpy as np

from data_pipeline.shards import check_shards, manifest_sha, map_tokens, read_manifest
from loopstack.errors import UserError

_MASK = (1 << 64) - 1
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
OPEN_SHARDS = max(64, min(1024, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4))  # mapped shards kept open


def _mix64(z: int) -> int:
    """splitmix64's finalizer on a Python int."""
    z = ((z ^ (z >> 30)) * _M1) & _MASK
    z = ((z ^ (z >> 27)) * _M2) & _MASK
    return z ^ (z >> 31)


def hash64(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = _mix64(((h ^ (p & _MASK)) + 0x9E3779B97F4A7C15) & _MASK)
    return h


def _mix_np(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> 30)) * np.uint64(_M1)
    z = (z ^ (z >> 27)) * np.uint64(_M2)
    return z ^ (z >> 31)


@functools.lru_cache(maxsize=256)
def _round_keys(key: int, rounds: int) -> list[np.uint64]:
    return [np.uint64(hash64(key, r)) for r in range(rounds)]


def permute(x: np.ndarray, n: int, key: int, rounds: int = 4) -> np.ndarray:
    """A keyed bijection of [0, n) applied to `x`, without a table.

    Feistel rounds on (L, R) in [0, m)^2 with m = ceil(sqrt(n)): (L, R) -> (R, (L + F(R)) mod m) is
    invertible, so it permutes [0, m^2); values landing in [n, m^2) are walked along their cycle until
    they are back in [0, n) (m^2 < n + 2 sqrt(n) + 1, so rarely more than one step).
    """
    x = np.asarray(x, np.int64)
    if n <= 1:
        return x.copy()
    m = math.isqrt(n - 1) + 1
    mod = np.uint64(m)
    keys = _round_keys(key, rounds)
    y = x.astype(np.uint64)
    idx = np.arange(len(y))
    while idx.size:
        left, right = np.divmod(y[idx], mod)
        for k in keys:
            left, right = right, (left + _mix_np(right ^ k) % mod) % mod
        v = left * mod + right
        y[idx] = v
        idx = idx[v >= np.uint64(n)]
    return y.astype(np.int64)


class _Stream:
    """One manifest as a token stream over memory-mapped shards, with its train/eval sample index."""

    def __init__(self, directory: str, seq_len: int, split: str, eval_fraction: float, tokenizer_sha256: str | None):
        self.dir = Path(directory)
        self.manifest = m = read_manifest(self.dir)
        if tokenizer_sha256 is not None and m["tokenizer"]["sha256"] != tokenizer_sha256:
            raise UserError(f"{self.dir}: prepared with tokenizer {m['tokenizer']['sha256'][:12]}, this run uses "
                            f"{tokenizer_sha256[:12]}; prepare it again with the run's tokenizer")
        problems = check_shards(self.dir, m, full=False)
        if problems:
            raise UserError(f"{self.dir}: refusing corrupt data: {'; '.join(problems)}; see `loopstack data verify`")
        self.sha = manifest_sha(self.dir)
        self.files = [self.dir / s["file"] for s in m["shards"]]
        self.starts = [0]
        for s in m["shards"]:
            self.starts.append(self.starts[-1] + s["tokens"])
        self.eos = m["tokenizer"]["eos_id"]
        self.dtype = m["dtype"]
        self._open: OrderedDict[int, tuple[list[np.ndarray], list[int]]] = OrderedDict()
        self._layouts: dict[int, list[tuple[int, int]]] = {}
        total = self.starts[-1]
        n_all = max(0, (total - 1) // seq_len)
        self.block = max(1, min(64, n_all // 1000))
        blocks = n_all // self.block
        n_eval = 0
        if eval_fraction > 0 and blocks >= 2:
            n_eval = min(blocks - 1, max(1, round(blocks * eval_fraction)))
        self.eval_blocks = np.array([math.floor((k + 0.5) * blocks / n_eval) for k in range(n_eval)], np.int64)
        self._shifted = self.eval_blocks - np.arange(n_eval)
        self.split, self.held_out = split, eval_fraction > 0
        self.n = (n_eval * self.block if split == "eval" else n_all - n_eval * self.block) if self.held_out else n_all
        if self.n < 1:
            raise UserError(f"{self.dir}: {total} tokens give no {split} sequences of seq_len {seq_len} "
                            f"(eval_fraction {eval_fraction}); use more data or a shorter data.seq_len")

    def sample_index(self, j: np.ndarray) -> np.ndarray:
        """Index among this split's samples -> index among all samples of the manifest."""
        if not self.held_out:
            return j
        b, off = np.divmod(j, self.block)
        if self.split == "eval":
            return self.eval_blocks[b] * self.block + off
        return (b + np.searchsorted(self._shifted, b, side="right")) * self.block + off

    def _shard(self, s: int) -> tuple[list[np.ndarray], list[int]]:
        """Token arrays of shard s (mapped, LRU of OPEN_SHARDS files) and their start offsets."""
        hit = self._open.get(s)
        if hit is not None:
            self._open.move_to_end(s)
            return hit
        arrays, self._layouts[s] = map_tokens(self.files[s], self._layouts.get(s), self.dtype)
        starts = [0]
        for a in arrays:
            starts.append(starts[-1] + len(a))
        self._open[s] = hit = (arrays, starts)
        if len(self._open) > OPEN_SHARDS:
            self._open.popitem(last=False)
        return hit

    def read(self, start: int, out: np.ndarray) -> None:
        """Copy tokens [start, start + len(out)) of the stream into `out`."""
        pos, filled, length = start, 0, len(out)
        while filled < length:
            s = bisect.bisect_right(self.starts, pos) - 1
            arrays, bstarts = self._shard(s)
            within = pos - self.starts[s]
            b = bisect.bisect_right(bstarts, within) - 1
            off = within - bstarts[b]
            take = min(len(arrays[b]) - off, length - filled)
            out[filled:filled + take] = arrays[b][off:off + take]
            filled += take
            pos += take


class PackedDataset:
    """Packed `seq_len + 1`-token rows from one or more prepared directories, for one DP rank.

    `next_batch()` -> {"tokens": int64 [micro_batch, seq_len + 1]} and, with `document_masking`,
    {"doc_ids": int32 [micro_batch, seq_len + 1]}: the index of the document each position belongs
    to within its row (0, 1, ...; an EOS belongs to the document it ends). Attention may cross
    positions with equal doc_ids only.
    """

    def __init__(self, dirs: list[str] | str, seq_len: int, *, micro_batch: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, weights: list[float] | None = None, split: str = "train", eval_fraction: float = 0.0,
                 tokenizer_sha256: str | None = None, document_masking: bool = False):
        dirs = [dirs] if isinstance(dirs, (str, Path)) else list(dirs)
        if not dirs:
            raise UserError("no data directories for the loader (data.train / data.out)")
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
        if not (0 <= dp_rank < dp_size) or micro_batch < 1 or seq_len < 1:
            raise ValueError(f"bad loader layout: dp_rank {dp_rank}, dp_size {dp_size}, micro_batch {micro_batch}")
        self.seq_len, self.micro_batch, self.dp_rank, self.dp_size = seq_len, micro_batch, dp_rank, dp_size
        self.seed, self.split, self.eval_fraction = seed, split, eval_fraction
        self.document_masking = document_masking
        self.streams = [_Stream(str(d), seq_len, split, eval_fraction, tokenizer_sha256) for d in dirs]
        shas = {s.manifest["tokenizer"]["sha256"] for s in self.streams}
        if len(shas) > 1:
            raise UserError(f"{', '.join(map(str, dirs))}: prepared with different tokenizers; prepare them with one")
        self.tokenizer_sha256 = shas.pop()
        self.eos_id = self.streams[0].eos
        if weights is not None and len(weights) != len(dirs):
            raise UserError(f"data.weights: {len(weights)} weights for {len(dirs)} directories")
        raw = [Fraction(repr(float(w))) for w in weights] if weights is not None else \
            [Fraction(s.n) for s in self.streams]
        if any(w < 0 for w in raw) or sum(raw) <= 0:
            raise UserError(f"data.weights = {weights}: need non-negative weights with a positive sum")
        self.weights = [w / sum(raw) for w in raw]
        self._ratios = []  # manifest m's share of what manifests < m leave
        rest = Fraction(1)
        for w in self.weights:
            self._ratios.append(w / rest if rest > 0 else Fraction(1))
            rest -= w
        self._ratios[-1] = Fraction(1)
        self.cursor = 0

    # --- sizes ----------------------------------------------------------------------------------------

    @property
    def num_samples(self) -> int:
        """Sequences in this split (all manifests): one epoch at the default weights."""
        return sum(s.n for s in self.streams)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.dp_size

    def draws(self, cursor: int | None = None) -> list[int]:
        """How many samples each manifest has given out before global position `cursor`."""
        r = self.cursor if cursor is None else cursor
        out = []
        for ratio in self._ratios:
            c = (ratio.numerator * r) // ratio.denominator
            out.append(c)
            r -= c
        return out

    @property
    def epoch(self) -> int:
        """Completed passes over the least-consumed manifest with a positive weight."""
        return self.epoch_at(self.cursor)

    def epoch_at(self, cursor: int) -> int:
        return min(d // s.n for d, s, w in zip(self.draws(cursor), self.streams, self.weights, strict=True) if w > 0)

    # --- sampling -------------------------------------------------------------------------------------

    def _locate(self, q: int) -> tuple[int, int]:
        """Global position -> (manifest, its draw number)."""
        r = q
        for m, ratio in enumerate(self._ratios):
            a, b = ratio.numerator, ratio.denominator
            before, after = (a * r) // b, (a * (r + 1)) // b
            if after > before:
                return m, before
            r -= after
        raise AssertionError("unreachable: the last manifest takes every remaining position")

    def _rows(self, positions: range) -> np.ndarray:
        rows = np.empty((len(positions), self.seq_len + 1), np.int64)
        located = [self._locate(q) for q in positions]
        for m, stream in enumerate(self.streams):
            idx = [i for i, (mm, _) in enumerate(located) if mm == m]
            if not idx:
                continue
            draws = np.array([located[i][1] for i in idx], np.int64)
            epochs, local = np.divmod(draws, stream.n)
            samples = np.empty_like(local)
            for e in np.unique(epochs):
                sel = epochs == e
                key = hash64(self.seed, m, int(e), self.split == "eval")
                samples[sel] = permute(local[sel], stream.n, key)
            starts = stream.sample_index(samples) * self.seq_len
            for i, start in zip(idx, starts.tolist(), strict=True):
                stream.read(start, rows[i])
        return rows

    def next_batch(self) -> dict[str, np.ndarray]:
        first = self.cursor + self.dp_rank * self.micro_batch
        tokens = self._rows(range(first, first + self.micro_batch))
        self.cursor += self.global_batch
        batch = {"tokens": tokens}
        if self.document_masking:
            is_eos = tokens == self.eos_id
            batch["doc_ids"] = (np.cumsum(is_eos, axis=1) - is_eos).astype(np.int32)
        return batch

    def __iter__(self):
        while True:
            yield self.next_batch()

    def reset(self) -> None:
        """Back to the first batch (eval: every evaluation sees the same sequences)."""
        self.cursor = 0

    # --- resumption -----------------------------------------------------------------------------------

    def _identity(self) -> dict:
        return {"split": self.split, "seq_len": self.seq_len, "seed": self.seed, "eval_fraction": self.eval_fraction,
                "manifests": [s.sha for s in self.streams], "weights": [str(w) for w in self.weights]}

    def state_dict(self) -> dict:
        """JSON-serialisable and identical on every rank: the global cursor plus what it refers to."""
        return {"version": 1, "cursor": self.cursor, "epoch": self.epoch, "draws": self.draws(),
                "dirs": [str(s.dir) for s in self.streams], **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` was saved; it must describe the same data, split and order."""
        if state.get("version") != 1:
            raise UserError(f"loader state version {state.get('version')!r} is not supported")
        mine = self._identity()
        for key, value in mine.items():
            if state.get(key) != value:
                what = "the manifests changed (different data)" if key == "manifests" else \
                    f"{key} = {state.get(key)!r}, this run has {value!r}"
                raise UserError(f"cannot resume the data loader: {what}")
        self.cursor = int(state["cursor"])
