import json
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.loader import PackedDataset, permute
from data_pipeline.prepare import prepare
from data_pipeline.shards import read_manifest
from data_pipeline.tokenizer import load_tokenizer
from loopstack.errors import UserError

L = 32


@pytest.fixture(scope="module")
def prepared(tok_dir, tmp_path_factory) -> Path:
    """Random words in 40 files, several shards: every window of the stream is unique, so rows identify samples."""
    base = tmp_path_factory.mktemp("unique")
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 9))) for _ in range(2000)]
    (base / "corpus").mkdir()
    for i in range(40):
        (base / "corpus" / f"{i:02d}.txt").write_text(" ".join(rng.choice(words, 300 + 10 * i)) + "\n")
    prepare([str(base / "corpus")], tok_dir, base / "shards", workers=1, shard_mb=0.03, verbose=False)
    ds = PackedDataset([base / "shards"], L, micro_batch=1)
    rows = rows_of(ds, ds.num_samples)
    assert len(set(rows)) == len(rows) > 1000 and len(read_manifest(base / "shards")["shards"]) > 3
    return base / "shards"


def rows_of(ds: PackedDataset, batches: int) -> list[bytes]:
    return [r.tobytes() for _ in range(batches) for r in ds.next_batch()["tokens"]]


def make(prepared, **kw) -> PackedDataset:
    args = dict(micro_batch=4, dp_rank=0, dp_size=1, seed=7)
    args.update(kw)
    return PackedDataset([prepared], L, **args)


def test_permutation_is_a_bijection_for_any_size():
    for n in (1, 2, 3, 17, 1000, 4097):
        x = permute(np.arange(n), n, key=n)
        assert sorted(x.tolist()) == list(range(n))
    assert not np.array_equal(permute(np.arange(100), 100, 1), permute(np.arange(100), 100, 2))


def test_resume_mid_epoch_continues_exactly(prepared):
    ref = make(prepared)
    n_batches = ref.num_samples // 4
    want = rows_of(ref, n_batches + 5)  # crosses into the second epoch
    for k in (1, n_batches // 2, n_batches - 1, n_batches + 2):
        first = make(prepared)
        got = rows_of(first, k)
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
        second = make(prepared)
        second.load_state_dict(state)
        got += rows_of(second, n_batches + 5 - k)
        assert got == want, k


def test_epochs_cover_everything_in_a_new_order(prepared):
    ds = make(prepared, micro_batch=1)
    n = ds.num_samples
    e1, e2 = rows_of(ds, n), rows_of(ds, n)
    assert sorted(e1) == sorted(e2) and len(set(e1)) == n and e1 != e2
    assert ds.epoch == 2 and ds.state_dict()["epoch"] == 2


def test_dp_ranks_get_disjoint_shares_that_cover_the_epoch(prepared):
    single = make(prepared, micro_batch=4)
    n_steps = single.num_samples // 8
    ranks = [make(prepared, dp_rank=r, dp_size=2) for r in range(2)]
    per_rank = [rows_of(ds, n_steps) for ds in ranks]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(rows_of(single, 2 * n_steps))
    assert ranks[0].state_dict() == ranks[1].state_dict()  # identical state on every rank
    tp_twin = make(prepared, dp_rank=1, dp_size=2)  # a TP peer passes the same dp_rank
    assert rows_of(tp_twin, 3) == per_rank[1][:12]


def test_dp_resize_two_to_one_neither_repeats_nor_skips(prepared):
    ranks = [make(prepared, dp_rank=r, dp_size=2, micro_batch=3) for r in range(2)]
    n = ranks[0].num_samples
    seen = []
    for _ in range(5):
        for ds in ranks:
            seen += rows_of(ds, 1)
    state = ranks[0].state_dict()
    one = make(prepared, micro_batch=5)
    one.load_state_dict(state)
    while len(seen) < n:
        seen += rows_of(one, 1)
    seen = seen[:n]
    assert len(set(seen)) == n  # no sample twice within the epoch...
    assert sorted(seen) == sorted(rows_of(make(prepared, micro_batch=1), n))  # ...and none missing


@pytest.fixture(scope="module")
def two_corpora(tok_dir, tmp_path_factory) -> tuple[Path, Path]:
    """Manifests of only 'a' text and only 'b' text, so a row tells which it came from."""
    base = tmp_path_factory.mktemp("mix")
    dirs = []
    for name, size in (("a", 60), ("b", 20)):
        (base / name).mkdir()
        for i in range(size):
            (base / name / f"{i}.txt").write_text(f"{name} " * (100 + i))
        prepare([str(base / name)], tok_dir, base / f"{name}-shards", workers=1, verbose=False)
        dirs.append(base / f"{name}-shards")
    return tuple(dirs)


def _which(row: np.ndarray, a_tokens: set) -> int:
    return 0 if set(row.tolist()) - {2} <= a_tokens else 1


def test_mixture_proportions(two_corpora, tok_dir):
    tok = load_tokenizer(tok_dir)
    a_tokens = set(tok.encode("a " * 50))
    for weights in ([0.3, 0.7], [0.9, 0.1], None):
        ds = PackedDataset(list(two_corpora), L, micro_batch=10, seed=1, weights=weights)
        sizes = [s.n for s in ds.streams]
        share = weights[0] if weights else sizes[0] / sum(sizes)
        src = []
        for steps in (1, 7, 40, 300):
            src += [_which(r, a_tokens) for _ in range(steps) for r in ds.next_batch()["tokens"]]
            assert abs(src.count(0) - share * len(src)) <= 1  # exact at every prefix, within one sample
            assert ds.draws()[0] == src.count(0)
    ds = PackedDataset(list(two_corpora), L, micro_batch=1, seed=1)  # default = sizes: one epoch of each
    src = [_which(np.frombuffer(r, np.int64), a_tokens) for r in rows_of(ds, ds.num_samples)]
    assert ds.draws() == [s.n for s in ds.streams] == [src.count(0), src.count(1)]


def test_eval_split_is_held_out_disjoint_and_repeatable(prepared):
    kw = dict(eval_fraction=0.05, micro_batch=4)
    train, ev = make(prepared, split="train", **kw), make(prepared, split="eval", **kw)
    full = make(prepared)
    assert train.num_samples + ev.num_samples == full.num_samples
    assert abs(ev.num_samples / full.num_samples - 0.05) < 0.02
    s_train, s_eval = train.streams[0], ev.streams[0]
    tr_idx = set(s_train.sample_index(np.arange(s_train.n)).tolist())
    ev_idx = set(s_eval.sample_index(np.arange(s_eval.n)).tolist())
    assert not tr_idx & ev_idx and tr_idx | ev_idx == set(range(full.num_samples))
    assert max(ev_idx) > 0.8 * full.num_samples and min(ev_idx) < 0.2 * full.num_samples  # spread out
    first = rows_of(ev, 5)
    assert rows_of(make(prepared, split="eval", **kw), 5) == first  # a fresh instance: same sequences
    ev.reset()
    assert rows_of(ev, 5) == first
    assert not set(rows_of(train, train.num_samples // 4)) & set(rows_of(ev, ev.num_samples // 4))
    assert make(prepared, split="eval", seed=99, **kw).num_samples == ev.num_samples  # the seed does not move it


def test_document_boundaries(prepared):
    batch = make(prepared, document_masking=True).next_batch()
    tokens, doc_ids = batch["tokens"], batch["doc_ids"]
    assert tokens.dtype == np.int64 and tokens.shape == (4, L + 1) and doc_ids.shape == tokens.shape
    eos = load_tokenizer(prepared / "tokenizer").eos_id
    for t, d in zip(tokens, doc_ids, strict=True):
        assert d[0] == 0 and np.all(np.diff(d) >= 0)
        ends = np.flatnonzero(t == eos)
        assert np.array_equal(np.flatnonzero(np.diff(d)), ends[ends < L])  # increments right after each EOS


def test_open_checks_are_user_errors(prepared, tmp_path, tok_dir):
    with pytest.raises(UserError, match="no manifest.json"):
        PackedDataset([tmp_path], L, micro_batch=1)
    with pytest.raises(UserError, match="prepared with tokenizer"):
        make(prepared, tokenizer_sha256="f" * 64)
    make(prepared, tokenizer_sha256=load_tokenizer(tok_dir).sha256)
    other = make(prepared, seed=8)
    with pytest.raises(UserError, match="seed"):
        other.load_state_dict(make(prepared).state_dict())
    with pytest.raises(UserError, match="seq_len"):
        PackedDataset([prepared], L + 1, micro_batch=4, seed=7).load_state_dict(make(prepared).state_dict())
    with pytest.raises(UserError, match="gives no|give no"):
        PackedDataset([prepared], 10**8, micro_batch=1)


def test_byte_flipped_in_place_with_mtime_restored_is_refused(prepared, tmp_path):
    """An edit that keeps the size and puts the mtime back is still caught: the hash cache keys on the ctime,
    which no user call can set back."""
    import os
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    make(copy)  # hashes every shard once and stamps them
    shard = sorted(copy.glob("shard-*.arrow"))[0]
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert shard.stat().st_size == st.st_size and shard.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(UserError, match=f"{shard}: sha256 mismatch"):
        make(copy)
