"""Input shards, row parsing with rejects, and resumable shard output for the batch classifier.

Inputs are JSON lines, CSV or Parquet files on any fsspec filesystem (a local path, ``s3://``,
``gs://``, … where its fsspec driver is installed). The driver scans each file once and cuts it
into shards of ``shard_rows`` records (JSON lines and CSV: the byte offset where each shard
starts; Parquet: row ranges). A worker parses one shard: every record becomes either a row to
classify or a reject with a reason, so rows in = rows out + rejects. Blank lines of a JSON-lines
file are not records.

Output is written by the worker that classified the shard, as soon as the shard is done (not by
the driver when results come back: Ray Data hands them back late, and a killed driver never gets
them): ``parts/<key>.<ext>``, then ``rejects/<key>.jsonl``, then the ``done/<key>.json`` marker.
Each file is written whole under a hidden temporary name in its own folder (``.<name>.<random>.tmp``)
and renamed into place (on a local or mounted filesystem: fsync, then ``os.replace``, atomic), so
a reader sees a file complete or not at all, and a marker only after its shard's files. A re-run
skips the shards marked done; readers ignore temporary names, and the driver removes those an
interrupted write left behind once a run is over (``remove_temp``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}
EXT = {"jsonl": "jsonl", "csv": "csv", "parquet": "parquet"}
RAW_CHARS = 300  # how much of a rejected record the rejects file keeps


@dataclass
class Shard:
    key: str
    path: str
    fmt: str
    start_row: int  # 1-based number of the shard's first record in its file
    n_rows: int
    offset: int = 0  # JSON lines / CSV: byte offset of the first record
    header: list[str] = field(default_factory=list)  # CSV: the file's header
    label: str = ""  # the file as ids name it when there is no id field ("" for a single file)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> Shard:
        return Shard(**json.loads(text))


@dataclass
class Parsed:
    """A shard's records: (row, id, text) to classify and rejects (dicts with a reason)."""

    rows: list[tuple[int, Any, str]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------- files


def filesystem(path: str):
    import fsspec

    fs, _, paths = fsspec.get_fs_token_paths(path)
    return fs, paths


def list_inputs(path: str, fmt: str | None = None) -> tuple[Any, list[str], str]:
    """(filesystem, files in order, format) of an input path: a file, a folder (its files of
    the format, sorted) or a glob."""
    fs, paths = filesystem(path)
    files: list[str] = []
    for p in paths:
        if fs.isdir(p):
            files += sorted(f for f in fs.find(p) if _fmt_of(f) and (fmt is None or _fmt_of(f) == fmt))
        else:
            files.append(p)
    if not files:
        raise FileNotFoundError(f"no input files at {path}")
    kinds = {fmt or _fmt_of(f) for f in files}
    kind = kinds.pop() if len(kinds) == 1 else None
    if kind is None:
        raise ValueError(f"cannot tell one input format from the file names {files[:3]}; pass --format")
    return fs, files, kind


def _fmt_of(path: str) -> str | None:
    name = path.lower()
    return next((f for ext, f in FORMATS.items() if name.endswith(ext)), None)


def fingerprint(fs, files: list[str]) -> list[dict[str, Any]]:
    out = []
    for f in files:
        info = fs.info(f)
        out.append(
            {"path": f, "size": info.get("size"), "mtime": str(info.get("mtime") or info.get("LastModified") or "")}
        )
    return out


# ---------------------------------------------------------------------------- records


def _lines(f, offset: int) -> Iterator[tuple[int, bytes]]:
    f.seek(offset)
    pos = offset
    for line in f:
        yield pos, line
        pos += len(line)


def jsonl_records(f, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """(byte offset, raw line) of each non-blank line from `offset`."""
    for pos, line in _lines(f, offset):
        if line.strip():
            yield pos, line


def csv_records(f, offset: int = 0) -> Iterator[tuple[int, list[str] | Exception, str]]:
    """(byte offset, fields or the parse error, raw text) of each CSV record from `offset`;
    undecodable bytes survive as surrogate escapes (rejected later as bad encoding)."""
    state: dict[str, Any] = {"pos": offset, "raw": []}

    def feed():
        for pos, line in _lines(f, offset):
            state["pos"] = pos + len(line)
            text = line.decode("utf-8", "surrogateescape")
            state["raw"].append(text)
            yield text

    reader = csv.reader(feed(), strict=True)
    while True:
        start = state["pos"]
        state["raw"] = []
        try:
            fields: list[str] | Exception = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            fields = exc
        yield start, fields, "".join(state["raw"])


def plan_file(fs, path: str, fmt: str, file_index: int, shard_rows: int, label: str) -> list[Shard]:
    """Cut one file into shards of `shard_rows` records (one pass over the file)."""
    shards: list[Shard] = []

    def add(start_row: int, n: int, offset: int = 0, header: list[str] | None = None) -> None:
        shards.append(
            Shard(f"{file_index:04d}-{len(shards):06d}", path, fmt, start_row, n, offset, header or [], label)
        )

    if fmt == "parquet":
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            total = pq.ParquetFile(f).metadata.num_rows
        for start in range(0, total, shard_rows):
            add(start + 1, min(shard_rows, total - start))
        return shards
    with fs.open(path, "rb") as f:
        header: list[str] = []
        records: Iterator[Any]
        if fmt == "csv":
            records = csv_records(f)
            first = next(records, None)
            if first is None or isinstance(first[1], Exception):
                raise ValueError(f"{path}: no readable CSV header")
            header = [h.strip().lstrip("\ufeff") for h in first[1]]
        else:
            records = jsonl_records(f)
        offsets, count = [], 0
        for rec in records:
            if count % shard_rows == 0:
                offsets.append(rec[0])
            count += 1
        for k, off in enumerate(offsets):
            add(k * shard_rows + 1, min(shard_rows, count - k * shard_rows), off, header)
    return shards


def _raw(data: bytes | str) -> str:
    if isinstance(data, bytes):
        data = data.decode("utf-8", "backslashreplace")
    else:
        data = data.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return data[:RAW_CHARS]


def parse_shard(fs, shard: Shard, text_field: str, id_field: str | None, max_chars: int) -> Parsed:
    """The shard's rows to classify and its rejects (reason, detail, source, row, raw)."""
    out = Parsed()

    def reject(row: int, reason: str, detail: str, raw: Any = "", rid: Any = None) -> None:
        out.rejects.append(
            {
                "source": shard.path,
                "row": row,
                "id": rid,
                "reason": reason,
                "detail": detail,
                "raw": _raw(raw) if raw else "",
            }
        )

    def take(row: int, record: Any, raw: Any) -> None:
        if not isinstance(record, dict):
            return reject(row, "not_an_object", f"a JSON {type(record).__name__}, not an object", raw)
        rid = record.get(id_field) if id_field else (f"{shard.label}:{row}" if shard.label else row)
        if id_field and (rid is None or rid == ""):
            return reject(row, "missing_id", f"no {id_field!r} field", raw)
        text = record.get(text_field)
        if text is None:
            return reject(row, "missing_text", f"no {text_field!r} field", raw, rid)
        if not isinstance(text, str):
            return reject(row, "text_not_a_string", f"{text_field!r} is a {type(text).__name__}", raw, rid)
        if not text.strip():
            return reject(row, "empty_text", f"{text_field!r} is empty", raw, rid)
        if any("\ud800" <= ch <= "\udfff" for ch in text):
            return reject(
                row, "bad_encoding", "text is not valid Unicode (undecodable bytes or a lone surrogate)", raw, rid
            )
        if len(text) > max_chars:
            return reject(row, "too_long", f"{len(text)} characters, more than {max_chars}", raw, rid)
        out.rows.append((row, rid, text))

    if shard.fmt == "parquet":
        import pyarrow.parquet as pq

        cols = [text_field] + ([id_field] if id_field else [])
        with fs.open(shard.path, "rb") as f:
            pf = pq.ParquetFile(f)
            missing = [c for c in cols if c not in pf.schema_arrow.names]
            table = pf.read(columns=[c for c in cols if c not in missing])
        table = table.slice(shard.start_row - 1, shard.n_rows)
        for i, record in enumerate(table.to_pylist()):
            take(shard.start_row + i, record, json.dumps(record, ensure_ascii=False, default=str))
        return out
    with fs.open(shard.path, "rb") as f:
        if shard.fmt == "csv":
            records = csv_records(f, shard.offset)
            for i in range(shard.n_rows):
                row = shard.start_row + i
                _, fields, raw = next(records)
                if isinstance(fields, Exception):
                    reject(row, "malformed_csv", str(fields), raw)
                elif len(fields) != len(shard.header):
                    reject(row, "malformed_csv", f"{len(fields)} fields, the header has {len(shard.header)}", raw)
                else:
                    take(row, dict(zip(shard.header, fields)), raw)
        else:
            lines = jsonl_records(f, shard.offset)
            for i in range(shard.n_rows):
                row = shard.start_row + i
                _, line = next(lines)
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    reject(row, "bad_encoding", f"not UTF-8: {exc}", line)
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as exc:
                    truncated = not line.endswith(b"\n") and i == shard.n_rows - 1
                    reject(
                        row,
                        "truncated" if truncated else "malformed_json",
                        ("last line cut short: " if truncated else "") + str(exc),
                        line,
                    )
                    continue
                take(row, record, line)
    return out


# ---------------------------------------------------------------------------- output


def encode_output(fmt: str, rows: list[dict[str, Any]], labels: list[str]) -> bytes:
    """Output rows (id, label, scores) in the input's format family: JSON lines with a
    ``scores`` object; CSV and Parquet with one ``score_<label>`` column per label."""
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    flat = [{"id": r["id"], "label": r["label"], **{f"score_{k}": r["scores"][k] for k in labels}} for r in rows]
    columns = ["id", "label", *(f"score_{k}" for k in labels)]
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, columns, lineterminator="\n")
        w.writeheader()
        w.writerows(flat)
        return buf.getvalue().encode()
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = io.BytesIO()
    table = pa.Table.from_pylist(flat) if flat else pa.table({c: pa.array([], pa.string()) for c in columns})
    pq.write_table(table, out)
    return out.getvalue()


TMP_SUFFIX = ".tmp"


def is_output_name(name: str) -> bool:
    """A finished output file's name (not a hidden temporary one)."""
    return not name.startswith(".") and not name.endswith(TMP_SUFFIX)


def _is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def put(fs, path: str, data: bytes) -> None:
    """Write `path` atomically: the whole content under a unique temporary name in the same
    folder, then a rename (local and mounted filesystems: fsync, ``os.replace``, fsync of the
    folder; others: fsspec's ``mv``, an object store's put being whole anyway)."""
    folder, name = path.rsplit("/", 1)
    tmp = f"{folder}/.{name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}"
    if not _is_local(fs):
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
        return
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # the rename itself durable (before the next file: the marker comes last)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # a filesystem without directory fsync
        pass


def write_shard(
    fs,
    out: str,
    shard: Shard,
    rows: list[dict[str, Any]],
    rejects: list[dict[str, Any]],
    labels: list[str],
    stats: dict[str, Any],
) -> None:
    """Write one finished shard, each file atomically; its ``done`` marker goes last."""
    for sub in ("parts", "rejects", "done"):
        fs.makedirs(f"{out}/{sub}", exist_ok=True)
    put(fs, f"{out}/parts/{shard.key}.{EXT[shard.fmt]}", encode_output(shard.fmt, rows, labels))
    put(
        fs,
        f"{out}/rejects/{shard.key}.jsonl",
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects).encode(),
    )
    put(fs, f"{out}/done/{shard.key}.json", json.dumps(stats).encode())


def done_marker(fs, out: str, key: str) -> dict[str, Any] | None:
    """The statistics in shard `key`'s done marker, or None while it is not done."""
    try:
        with fs.open(f"{out}/done/{key}.json", "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def _files(fs, folder: str) -> list[str]:
    """The finished files of an output folder, sorted (temporary names left out)."""
    if not fs.exists(folder):
        return []
    return sorted(p for p in fs.ls(folder, detail=False) if is_output_name(p.rsplit("/", 1)[-1]))


def done_shards(fs, out: str) -> dict[str, dict[str, Any]]:
    """The finished shards' statistics by key."""
    done = {}
    for p in _files(fs, f"{out}/done"):
        if p.endswith(".json"):
            with fs.open(p, "rb") as f:
                done[p.rsplit("/", 1)[-1][:-5]] = json.loads(f.read())
    return done


def remove_temp(fs, out: str) -> int:
    """Remove the temporary files interrupted writes left in the output folders (call it only
    while no worker writes there); how many."""
    n = 0
    for sub in ("parts", "rejects", "done"):
        if fs.exists(f"{out}/{sub}"):
            for p in fs.ls(f"{out}/{sub}", detail=False):
                if not is_output_name(p.rsplit("/", 1)[-1]):
                    fs.rm(p)
                    n += 1
    return n


def read_output(out: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(output rows, rejects) of a batch job's output folder, in shard order; CSV and Parquet
    rows get their ``scores`` back from the ``score_<label>`` columns."""
    fs, (root,) = filesystem(out)
    rows: list[dict[str, Any]] = []
    for p in _files(fs, f"{root}/parts"):
        with fs.open(p, "rb") as f:
            data = f.read()
        if p.endswith(".jsonl"):
            rows += [json.loads(line) for line in data.decode().splitlines() if line.strip()]
            continue
        if p.endswith(".csv"):
            flat = list(csv.DictReader(io.StringIO(data.decode())))
            conv = float
        else:
            import pyarrow.parquet as pq

            flat, conv = pq.read_table(io.BytesIO(data)).to_pylist(), float
        for r in flat:
            scores = {k[6:]: conv(v) for k, v in r.items() if k.startswith("score_")}
            rows.append({"id": r["id"], "label": r["label"], "scores": scores})
    rejects: list[dict[str, Any]] = []
    for p in _files(fs, f"{root}/rejects"):
        with fs.open(p, "rb") as f:
            rejects += [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
    return rows, rejects
