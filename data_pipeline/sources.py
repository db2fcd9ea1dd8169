"""Where documents come from: source specs, the file list, a work plan of units, and streaming readers.

A source spec is one string (a config list entry or a `--source` flag):

    [NAME=]LOCATION[#FIELD]

    stdlib                      every *.py of this interpreter's standard library (no site-packages)
    stdlib:json/*.py            a glob relative to the standard-library directory
    data/web/*.jsonl.zst        a file, folder (every non-hidden file below it) or glob (`**` recurses)
    hf:data/my_saved_ds@train   a Hugging Face dataset saved with `save_to_disk` (split after `@`),
                                or a local folder/files that `datasets.load_dataset` reads (streamed)
    web=data/web/*.jsonl#content   source named `web`, text in field `content`

NAME (letters, digits, `_.-`) labels the documents of that source in the shards; it defaults to
LOCATION. FIELD overrides `data.text_field` for jsonl/parquet/datasets. A path whose first component
contains `=` must be written `./lang=en/...`.

File formats go by extension (after an optional `.gz` / `.zst`): `.jsonl` `.ndjson` `.json` are JSON
lines (one document per line), `.parquet` is a text column, anything else is one document per file.

The plan cuts the ordered document stream into *units*: runs of whole small files, byte ranges of big
uncompressed JSON-lines files (a range holds the lines that *start* in it, so no scan is needed),
row-group ranges of parquet files, row ranges of saved datasets. A unit is read on its own by any
worker, and becomes one shard (more only when its output outgrows the shard budget). Units depend on
the inputs and settings only, never on the number of workers or slices: that is what makes the
output byte-identical however it is produced.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
import stat
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field

from loopstack.errors import UserError

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_GLOB_CHARS = re.compile(r"[*?\[]")
_SURROGATE = re.compile(rb"\\[uU][dD][89abAB]")
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
JSONL_EXT = (".jsonl", ".ndjson", ".json")
MiB = 1 << 20


@dataclass(frozen=True)
class Source:
    """One parsed source spec."""

    spec: str  # as written by the user
    name: str
    location: str  # what follows NAME= and precedes #FIELD
    text_field: str

    @property
    def is_hf(self) -> bool:
        return self.location.startswith("hf:")


def parse_source(spec: str, text_field: str = "text") -> Source:
    """`'web=data/*.jsonl#content'` -> Source(name='web', location='data/*.jsonl', text_field='content')."""
    rest = spec.strip()
    if not rest:
        raise UserError("empty source spec")
    name = None
    head, eq, tail = rest.partition("=")
    if eq and _NAME.match(head) and tail:
        name, rest = head, tail
    if "#" in rest:
        rest, _, fld = rest.rpartition("#")
        if not fld:
            raise UserError(f"source '{spec}': empty field name after '#'")
        text_field = fld
    if not rest:
        raise UserError(f"source '{spec}': no location")
    return Source(spec=spec, name=name or rest, location=rest, text_field=text_field)


def stdlib_dir() -> str:
    """The embedded corpus: the standard library of the running interpreter."""
    return sysconfig.get_paths()["stdlib"]


def _walk(root: str, suffix: str = "", skip: set[str] = frozenset()) -> list[str]:
    """Regular files below `root` (hidden names and `skip` dirs pruned), sorted: the order is the data."""
    out = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in skip]
        out += [os.path.join(dirpath, f) for f in files if not f.startswith(".") and f.endswith(suffix)]
    return sorted(out)


def source_files(src: Source) -> list[str]:
    """The files of a non-HF source, in a deterministic order."""
    loc = src.location
    if loc == "stdlib":
        files = _walk(stdlib_dir(), ".py", _SKIP_DIRS)
    elif loc.startswith("stdlib:"):
        root = stdlib_dir()
        matches = glob.glob(os.path.join(root, loc[len("stdlib:"):]), recursive=True)
        files = sorted(p for p in matches if os.path.isfile(p)
                       and not _SKIP_DIRS & set(os.path.relpath(p, root).split(os.sep)))
    elif _GLOB_CHARS.search(loc):
        files = []
        for p in sorted(glob.glob(loc, recursive=True)):
            files += _walk(p) if os.path.isdir(p) else [p]
    elif os.path.isdir(loc):
        files = _walk(loc)
    elif os.path.lexists(loc):
        files = [loc]
    else:
        raise UserError(f"source '{src.spec}': {loc}: no such file or directory")
    if not files:
        raise UserError(f"source '{src.spec}': matches no files")
    return files


def file_format(path: str) -> tuple[str, str]:
    """(format, compression) from the name: format in jsonl/parquet/text, compression in ''/gz/zst."""
    low = path.lower()
    comp = ""
    for ext in (".gz", ".zst"):
        if low.endswith(ext):
            comp, low = ext[1:], low[: -len(ext)]
    if low.endswith(JSONL_EXT):
        return "jsonl", comp
    if low.endswith(".parquet") and not comp:
        return "parquet", comp
    return "text", comp


# --- the plan ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """A readable part of one input: a whole file, a byte/row-group/row range, or a dataset shard."""

    path: str
    fmt: str  # text | jsonl | parquet | hf_saved | hf_stream
    start: int = 0
    stop: int = -1  # -1 = to the end
    size: int = 0  # bytes (estimated for compressed / parquet / datasets)
    mtime_ns: int = 0  # resume key only, never written to a manifest

    def describe(self) -> dict:
        return {"path": self.path, "fmt": self.fmt, "start": self.start, "stop": self.stop, "size": self.size}


@dataclass(frozen=True)
class Unit:
    """Consecutive pieces of one source: the grain of work, of resumption and of slicing."""

    index: int
    source: int
    pieces: tuple[Piece, ...]
    size: int = field(default=0)


def _stat(path: str, src: Source) -> os.stat_result:
    try:
        st = os.stat(path)
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err}) [source '{src.spec}']") from None
    if not stat.S_ISREG(st.st_mode):  # os.path.isfile's test on the stat already taken
        raise UserError(f"{path}: not a regular file [source '{src.spec}']")
    return st


def _file_pieces(path: str, st: os.stat_result, unit_bytes: int) -> list[Piece]:
    fmt, comp = file_format(path)
    if fmt == "jsonl" and not comp and st.st_size > unit_bytes:
        return [Piece(path, fmt, a, min(a + unit_bytes, st.st_size), min(unit_bytes, st.st_size - a), st.st_mtime_ns)
                for a in range(0, st.st_size, unit_bytes)]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            meta = pq.ParquetFile(path).metadata
        except Exception as err:  # any parse failure is the user's file
            raise UserError(f"{path}: cannot read parquet ({err})") from None
        pieces, a, size = [], 0, 0
        for g in range(meta.num_row_groups):
            gsize = meta.row_group(g).total_byte_size
            if size and size + gsize > unit_bytes:
                pieces.append(Piece(path, fmt, a, g, size, st.st_mtime_ns))
                a, size = g, 0
            size += gsize
        pieces.append(Piece(path, fmt, a, meta.num_row_groups, size, st.st_mtime_ns))
        return pieces
    return [Piece(path, fmt, 0, -1, st.st_size, st.st_mtime_ns)]


def _hf_open(src: Source):
    """(dataset, saved) for an `hf:` source; saved datasets are memory-mapped, others streamed."""
    import datasets  # only HF sources pay this import

    path, _, split = src.location[3:].partition("@")
    try:
        if os.path.isfile(os.path.join(path, "dataset_dict.json")):
            dd = datasets.load_from_disk(path)
            split = split or ("train" if "train" in dd else (next(iter(dd)) if len(dd) == 1 else ""))
            if split not in dd:
                raise UserError(f"source '{src.spec}': choose a split with @SPLIT, one of {', '.join(dd)}")
            return dd[split], True
        if os.path.isfile(os.path.join(path, "state.json")):
            return datasets.load_from_disk(path), True
        if not os.path.exists(path) and not glob.glob(path):
            raise UserError(f"source '{src.spec}': {path}: no such file or directory")
        if os.path.isdir(path):
            return datasets.load_dataset(path, split=split or "train", streaming=True), False
        fmt = {"jsonl": "json", "text": "text", "parquet": "parquet"}[file_format(path)[0]]
        return datasets.load_dataset(fmt, data_files=path, split=split or "train", streaming=True), False
    except UserError:
        raise
    except Exception as err:  # datasets raises many types for a bad path
        raise UserError(f"source '{src.spec}': cannot open with datasets ({type(err).__name__}: {err})") from None


def _hf_pieces(src: Source, unit_bytes: int) -> list[Piece]:
    ds, saved = _hf_open(src)
    if saved:
        if src.text_field not in ds.column_names:
            raise UserError(f"source '{src.spec}': no column '{src.text_field}' (columns: "
                            f"{', '.join(ds.column_names)}); set --text-field, data.text_field or #FIELD")
        rows = len(ds)
        total = max(1, ds.data.nbytes)
        per = max(1, unit_bytes * rows // total) if rows else 1
        return [Piece(src.location, "hf_saved", a, min(a + per, rows), total * (min(a + per, rows) - a) // max(rows, 1))
                for a in range(0, rows, per)] or [Piece(src.location, "hf_saved", 0, 0, 0)]
    n = max(1, ds.num_shards)
    return [Piece(src.location, "hf_stream", i, n, 0) for i in range(n)]


def plan_units(sources: list[Source], shard_bytes: int) -> tuple[list[Unit], int]:
    """Cut the sources into units; returns (units, unit_bytes).

    Units are at most `unit_bytes` = min(shard budget, max(1 MiB, corpus / 256)) unless one input
    cannot be split (a compressed file, one big document): small corpora still get enough units to
    keep every worker busy, big ones get shards of the configured size. Depends on the file list and
    sizes only.
    """
    per_source: list[tuple[list[tuple[str, os.stat_result]] | None, Source]] = []
    total = 0
    for src in sources:
        if src.is_hf:
            ds, saved = _hf_open(src)
            total += ds.data.nbytes if saved else 0
            per_source.append((None, src))
            continue
        files = [(p, _stat(p, src)) for p in source_files(src)]  # one stat per file for the whole plan
        per_source.append((files, src))
        total += sum(st.st_size for _, st in files)
    unit_bytes = max(1, min(shard_bytes, max(MiB, -(-total // 256))))
    units: list[Unit] = []
    for s, (files, src) in enumerate(per_source):
        pieces = _hf_pieces(src, unit_bytes) if files is None else [
            p for f, st in files for p in _file_pieces(f, st, unit_bytes)]
        group: list[Piece] = []
        size = 0
        for piece in pieces:
            if group and size + piece.size > unit_bytes:
                units.append(Unit(len(units), s, tuple(group), size))
                group, size = [], 0
            group.append(piece)
            size += piece.size
        if group:
            units.append(Unit(len(units), s, tuple(group), size))
    return units, unit_bytes


# --- readers -------------------------------------------------------------------------------------------


@dataclass
class Doc:
    """A document, or why it is unusable (`bad` set, `text` None). `where` names file and line/row."""

    text: str | None
    where: str
    bad: str = ""  # empty | not_utf8 | invalid_json | not_text | too_large
    detail: str = ""  # what exactly is wrong, when the kind alone does not say


def _open_binary(path: str) -> io.BufferedIOBase:
    fmt, comp = file_format(path)
    try:
        if comp == "gz":
            return gzip.open(path, "rb")
        f = open(path, "rb")
        if comp == "zst":
            import zstandard

            return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(f, closefd=True), 1 << 20)
        return f
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from None


def _line_base(path: str, start: int) -> int:
    """Line number (1-based) of the first line starting at or after byte `start` (only for messages)."""
    if start == 0:
        return 1
    n = 0
    with open(path, "rb") as f:
        left = start
        while left > 0:
            chunk = f.read(min(left, 1 << 24))
            if not chunk:
                break
            n += chunk.count(b"\n")
            left -= len(chunk)
    return n + 1


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _utf8_problem(err: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 (byte 0x{err.object[err.start]:02x} at offset {err.start})"


def _read_text(piece: Piece, max_doc_bytes: int) -> Iterator[Doc]:
    path = piece.path
    if piece.size > max_doc_bytes and not file_format(path)[1]:
        yield Doc(None, path, "too_large")
        return
    try:
        with _open_binary(path) as f:
            data = f.read(max_doc_bytes + 1)
    except UserError:
        raise
    except Exception as err:  # corrupt gzip/zstd streams raise many types
        raise UserError(f"{path}: cannot read ({getattr(err, 'strerror', None) or err})") from None
    if len(data) > max_doc_bytes:
        yield Doc(None, path, "too_large")
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        yield Doc(None, path, "not_utf8", _utf8_problem(err))
        return
    yield Doc(text, path, "" if text else "empty")


def _read_jsonl(piece: Piece, field_name: str, max_doc_bytes: int) -> Iterator[Doc]:
    path, start, stop = piece.path, piece.start, piece.stop
    base = None

    def where(i: int) -> str:
        nonlocal base
        if base is None:
            base = _line_base(path, start)
        return f"{path}:{base + i}"

    try:
        f = _open_binary(path)
        with f:
            if start > 0:
                f.seek(start - 1)
                f.readline()  # finish the line that started before this range
            pos = f.tell() if stop >= 0 else 0
            i = -1
            while stop < 0 or pos < stop:
                line = f.readline(max_doc_bytes + 2)  # never hold more than one document's worth
                if not line:
                    break
                i += 1
                pos += len(line)
                if len(line) > max_doc_bytes + 1 or (len(line) == max_doc_bytes + 1 and not line.endswith(b"\n")):
                    while line and not line.endswith(b"\n"):  # skip the rest of the line
                        line = f.readline(1 << 20)
                        pos += len(line)
                    yield Doc(None, where(i), "too_large")
                    continue
                if not line.strip():
                    continue
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as err:
                    yield Doc(None, where(i), "not_utf8", _utf8_problem(err))
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as err:
                    yield Doc(None, where(i), "invalid_json", f"invalid JSON ({err.msg})")
                    continue
                if not isinstance(record, dict):
                    yield Doc(None, where(i), "invalid_json", "not a JSON object")
                    continue
                if field_name not in record:
                    keys = ", ".join(list(record)[:8]) or "none"
                    raise UserError(f"{where(i)}: no field '{field_name}' (fields: {keys}); set --text-field, "
                                    f"data.text_field or #FIELD on the source")
                value = record[field_name]
                if value is None or value == "":
                    yield Doc(None, where(i), "empty")
                elif not isinstance(value, str):
                    kind = type(value).__name__
                    yield Doc(None, where(i), "not_text", f"field '{field_name}' is {kind}, not a string")
                elif _SURROGATE.search(line) and _has_lone_surrogate(value):
                    yield Doc(None, where(i), "not_utf8", "not valid UTF-8 (lone surrogate escape)")
                else:
                    yield Doc(value, path)
    except UserError:
        raise
    except Exception as err:  # corrupt gzip/zstd streams raise many types
        raise UserError(f"{path}: cannot read ({getattr(err, 'strerror', None) or err})") from None


def _text_column(values: list, where: str, first_row: int) -> Iterator[Doc]:
    for i, value in enumerate(values):
        if value is None or value == "":
            yield Doc(None, f"{where} row {first_row + i}", "empty")
        elif not isinstance(value, str):
            yield Doc(None, f"{where} row {first_row + i}", "not_text", f"{type(value).__name__}, not text")
        else:
            yield Doc(value, where)


def _read_parquet(piece: Piece, field_name: str) -> Iterator[Doc]:
    import pyarrow.parquet as pq

    path = piece.path
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if field_name not in names:
            raise UserError(f"{path}: no column '{field_name}' (columns: {', '.join(names[:8])}); set "
                            f"--text-field, data.text_field or #FIELD on the source")
        row = sum(pf.metadata.row_group(g).num_rows for g in range(piece.start))
        for batch in pf.iter_batches(batch_size=4096, row_groups=list(range(piece.start, piece.stop)),
                                     columns=[field_name]):
            yield from _text_column(batch.column(0).to_pylist(), path, row)
            row += batch.num_rows
    except UserError:
        raise
    except Exception as err:  # a corrupt parquet file is the user's
        raise UserError(f"{path}: cannot read parquet ({err})") from None


def _read_hf(piece: Piece, src: Source) -> Iterator[Doc]:
    ds, saved = _hf_open(src)
    where = f"hf:{piece.path[3:]}"
    if saved:
        arrow = ds.with_format("arrow")
        for a in range(piece.start, piece.stop, 4096):
            table = arrow[a:min(a + 4096, piece.stop)]
            yield from _text_column(table.column(src.text_field).to_pylist(), where, a)
        return
    for i, record in enumerate(ds.shard(num_shards=piece.stop, index=piece.start)):
        if src.text_field not in record:
            raise UserError(f"{where} shard {piece.start} row {i}: no field '{src.text_field}' (fields: "
                            f"{', '.join(list(record)[:8])}); set --text-field, data.text_field or #FIELD")
        yield from _text_column([record[src.text_field]], f"{where} shard {piece.start}", i)


def read_unit(unit: Unit, src: Source, max_doc_bytes: int) -> Iterator[Doc]:
    """Every document of a unit, in order; bad ones carry the reason and where they are."""
    for piece in unit.pieces:
        if piece.fmt == "text":
            yield from _read_text(piece, max_doc_bytes)
        elif piece.fmt == "jsonl":
            yield from _read_jsonl(piece, src.text_field, max_doc_bytes)
        elif piece.fmt == "parquet":
            yield from _read_parquet(piece, src.text_field)
        else:
            yield from _read_hf(piece, src)


def iter_documents(specs: list[str], text_field: str = "text", max_doc_bytes: int = 64 * MiB) -> Iterator[Doc]:
    """All documents of some sources in order (tokenizer training and tests use this)."""
    sources = [parse_source(s, text_field) for s in specs]
    units, _ = plan_units(sources, 64 * MiB)
    for unit in units:
        yield from read_unit(unit, sources[unit.source], max_doc_bytes)
