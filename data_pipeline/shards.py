"""Arrow shards and their manifest: the on-disk format every other step reads.

A shard is an uncompressed Arrow IPC *file* (memory-mappable, zero copy) with two columns:

    tokens  large_list<uint16 | uint32>   one row per document, ending with EOS
    source  dictionary<int16, string>     the source name of that document

Schema metadata names the format and the tokenizer sha256. A prepared directory holds the shards,
`tokenizer/` (a copy of the tokenizer, so the directory decodes on its own) and `manifest.json`,
written last and atomically: format, tokenizer identity, token dtype, settings, inputs, and per
shard its file name, size, sha256, documents and tokens. A directory without `manifest.json` is
not a dataset (yet).

`.verified.json` caches which files were hashed (name, size, mtime, ctime, inode) so the loader re-hashes
only shards that changed since `prepare` or `verify` last checked them. The ctime is what makes this safe:
an edit in place whose mtime was restored afterwards (`touch -d`, `os.utime`, `rsync -t`) still moves the
ctime, which no user call can set back, so the shard is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from loopstack.errors import UserError
from loopstack.fileio import atomic_write_json, fsync_path

FORMAT = "loopstack.shards/1"
MANIFEST = "manifest.json"
STAMP = ".verified.json"
DOC_OVERHEAD = 10  # bytes per document besides its tokens (int64 offset + int16 source index)


def shard_name(unit: int, part: int) -> str:
    return f"shard-{unit:06d}-{part:04d}.arrow"


def shard_schema(dtype: str, tokenizer_sha256: str) -> pa.Schema:
    return pa.schema([("tokens", pa.large_list(pa.from_numpy_dtype(np.dtype(dtype)))),
                      ("source", pa.dictionary(pa.int16(), pa.string()))],
                     metadata={"format": FORMAT, "tokenizer_sha256": tokenizer_sha256})


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: str | os.PathLike, what: str = "file") -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: no such {what}") from None
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable {what} ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a {what}")
    return data


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of a prepared directory, or a UserError saying what is missing."""
    d = Path(directory)
    if not d.is_dir():
        raise UserError(f"{d}: no such dataset directory")
    if not (d / MANIFEST).is_file():
        hint = " (only slice manifests: run `loopstack data merge`)" if list(d.glob("manifest.slice-*.json")) else \
            " (not prepared, or `loopstack data prepare` did not finish)"
        raise UserError(f"{d}: no {MANIFEST}{hint}")
    m = read_json(d / MANIFEST, "manifest")
    if m.get("format") != FORMAT:
        raise UserError(f"{d / MANIFEST}: format {m.get('format')!r}, expected {FORMAT!r}")
    return m


def _numeric_array(values: np.ndarray) -> pa.Array:
    """A null-free Arrow array over a numpy array's memory (no copy).

    Not `pa.array(ndarray)`: that imports pandas on first use (about 0.3 s per forked worker, more on a busy
    machine), and the IPC bytes written are the same either way.
    """
    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def _string_array(text: str) -> pa.Array:
    """A one-element Arrow string array (again without `pa.array`, which imports pandas)."""
    data = text.encode()
    return pa.Array.from_buffers(pa.string(), 1, [None, pa.py_buffer(np.array([0, len(data)], np.int32)),
                                                  pa.py_buffer(data)])


class ShardWriter:
    """Writes one unit's documents into parts `shard-UNIT-PART.arrow` of at most `budget` bytes.

    Batches are appended as record batches; a part closes before a batch would push it over the
    budget (splitting the batch between documents), so only a single document larger than the
    budget makes a larger part. Parts are written to a temp name, fsynced and renamed.
    """

    def __init__(self, out_dir: str | os.PathLike, unit: int, source: str, dtype: str, budget: int,
                 tokenizer_sha256: str):
        self.out_dir, self.unit, self.budget = Path(out_dir), unit, budget
        self.dtype = np.dtype(dtype)
        self.schema = shard_schema(dtype, tokenizer_sha256)
        self.source_dict = _string_array(source)
        self.parts: list[dict] = []
        self._sink = self._writer = None
        self._bytes = self._docs = self._tokens = 0

    def _open(self) -> None:
        name = shard_name(self.unit, len(self.parts))
        self._tmp = self.out_dir / f"{name}.tmp.{os.getpid()}"
        self._sink = pa.OSFile(str(self._tmp), "wb")
        self._writer = pa.ipc.new_file(self._sink, self.schema)
        self._bytes = self._docs = self._tokens = 0

    def _close_part(self) -> None:
        self._writer.close()
        self._sink.close()
        fsync_path(self._tmp)
        name = shard_name(self.unit, len(self.parts))
        final = self.out_dir / name
        digest = sha256_file(self._tmp)
        os.replace(self._tmp, final)
        self.parts.append({"file": name, "bytes": final.stat().st_size, "sha256": digest,
                           "documents": self._docs, "tokens": self._tokens})
        self._sink = self._writer = None

    def _write(self, offsets: np.ndarray, values: np.ndarray) -> None:
        n = len(offsets) - 1
        tokens = pa.LargeListArray.from_arrays(_numeric_array(offsets), _numeric_array(values))
        source = pa.DictionaryArray.from_arrays(_numeric_array(np.zeros(n, np.int16)), self.source_dict)
        self._writer.write_batch(pa.record_batch([tokens, source], schema=self.schema))
        self._docs += n
        self._tokens += int(offsets[-1])
        self._bytes += int(offsets[-1]) * self.dtype.itemsize + n * DOC_OVERHEAD

    def add(self, lengths: np.ndarray, values: np.ndarray) -> None:
        """Append documents: `lengths[i]` tokens each (EOS included), concatenated in `values`."""
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = values.astype(self.dtype, copy=False)
        first = 0
        while first < len(lengths):
            if self._writer is None:
                self._open()
            # documents that still fit: cumulative bytes from `first` within the room left
            cost = (offsets[first + 1:] - offsets[first]) * self.dtype.itemsize + \
                np.arange(1, len(lengths) - first + 1) * DOC_OVERHEAD
            fit = int(np.searchsorted(cost, self.budget - self._bytes, side="right"))
            if fit == 0 and self._docs:
                self._close_part()
                continue
            last = first + max(fit, 1)
            self._write(offsets[first:last + 1] - offsets[first], values[offsets[first]:offsets[last]])
            first = last

    def close(self) -> list[dict]:
        if self._writer is not None and self._docs:
            self._close_part()
        elif self._writer is not None:
            self.abort()
        return self.parts

    def abort(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
                self._sink.close()
            finally:
                self._tmp.unlink(missing_ok=True)
                self._sink = self._writer = None


def open_shard(path: str | os.PathLike) -> list[pa.RecordBatch]:
    """Memory-map a shard; its record batches reference the mapping (no copy)."""
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        return [reader.get_batch(i) for i in range(reader.num_record_batches)]
    except (OSError, pa.ArrowInvalid) as err:
        raise UserError(f"{path}: unreadable shard ({err})") from None


def shard_tokens(path: str | os.PathLike) -> list[np.ndarray]:
    """The token arrays (EOS-terminated documents, concatenated) of each record batch of a shard."""
    return [b.column(0).values.to_numpy(zero_copy_only=True) for b in open_shard(path)]


def map_tokens(path: str | os.PathLike, layout: list[tuple[int, int]] | None = None,
               dtype: str = "uint16") -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """Token arrays of a shard as numpy views of one `mmap`, plus the layout (byte offset, count) per batch.

    Parsing the Arrow footer costs far more than mapping a file; callers that reopen shards keep the
    layout and pass it back, so a reopen is an open + mmap.
    """
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable shard ({err})") from None
    if layout is None:
        buf = pa.py_buffer(mm)
        try:
            reader = pa.ipc.open_file(pa.BufferReader(buf))
        except pa.ArrowInvalid as err:
            raise UserError(f"{path}: unreadable shard ({err})") from None
        layout = []
        for i in range(reader.num_record_batches):
            values = reader.get_batch(i).column(0).values
            data = values.buffers()[1]
            layout.append((data.address - buf.address + values.offset * values.type.byte_width, len(values)))
        del reader, buf, values, data
    return [np.frombuffer(mm, np.dtype(dtype), count, offset) for offset, count in layout], layout


# --- integrity -----------------------------------------------------------------------------------------


def _stamp_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def write_stamp(directory: str | os.PathLike, manifest_sha: str, names: list[str]) -> None:
    """Record that these shards matched the manifest now (best effort: a read-only dir is fine)."""
    d = Path(directory)
    try:
        atomic_write_json(d / STAMP, {"manifest_sha256": manifest_sha,
                                      "shards": {n: _stamp_key(d / n) for n in names}}, indent=None)
    except OSError:
        pass


def manifest_sha(directory: str | os.PathLike) -> str:
    return sha256_file(Path(directory) / MANIFEST)


def check_shards(directory: str | os.PathLike, manifest: dict, *, full: bool) -> list[str]:
    """Problems with the shards of a manifest (empty = fine), one line each.

    Always: every shard exists with its recorded size. `full`: every sha256 is recomputed and the
    document/token counts are read back. Otherwise only shards that changed since the last stamp
    are hashed.
    """
    d = Path(directory)
    problems, hashed, fresh = [], [], 0
    m_sha = manifest_sha(d)
    stamp = {}
    if not full and (d / STAMP).is_file():
        try:
            s = json.loads((d / STAMP).read_text())
            stamp = s.get("shards", {}) if s.get("manifest_sha256") == m_sha else {}
        except (OSError, ValueError):
            stamp = {}
    for shard in manifest["shards"]:
        path = d / shard["file"]
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != shard["bytes"]:
            problems.append(f"{path}: {size} bytes, manifest says {shard['bytes']} (truncated or replaced)")
            continue
        if not full and stamp.get(shard["file"]) == _stamp_key(path):
            hashed.append(shard["file"])
            continue
        fresh += 1
        if sha256_file(path) != shard["sha256"]:
            problems.append(f"{path}: sha256 mismatch (corrupt or modified)")
            continue
        if full:
            try:
                batches = open_shard(path)
            except UserError as err:
                problems.append(str(err))
                continue
            docs = sum(b.num_rows for b in batches)
            toks = sum(len(b.column(0).values) for b in batches)
            if (docs, toks) != (shard["documents"], shard["tokens"]):
                problems.append(f"{path}: {docs} documents / {toks} tokens, manifest says "
                                f"{shard['documents']} / {shard['tokens']}")
                continue
        hashed.append(shard["file"])
    if not problems and fresh:
        write_stamp(d, m_sha, hashed)
    return problems


def verify(directory: str | os.PathLike) -> dict:
    """Full check of a prepared directory; raises one UserError line listing every bad shard."""
    manifest = read_manifest(directory)
    problems = check_shards(directory, manifest, full=True)
    if problems:
        n = len(manifest["shards"])
        raise UserError(f"{directory}: {len(problems)} of {n} shards failed verification: " + "; ".join(problems))
    return manifest
