"""Documents from what users have: text files, JSONL / JSON / Parquet, Hugging Face datasets.

Inputs are split into *units* (a byte range of a text or JSONL file, a Parquet row group, a shard
of a Hugging Face dataset). A unit is the piece of work one process tokenizes into one shard, so
the unit list is deterministic: the same inputs always give the same shards, which is what
makes preparation resumable. Documents are streamed: memory does not grow with the input.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sdd_train.exit_codes import UsageError

FORMATS = ("auto", "text", "lines", "jsonl", "json", "parquet", "hf")
TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".text", ".tex", ".html", ".c", ".h", ".cpp", ".js", ".ts", ".rs"}
UNIT_BYTES = 32 * 2**20  # text/JSONL files larger than this are split into line-aligned byte ranges


class DataError(UsageError):
    """Bad input data (files, datasets, tokenizers): the message names the file and what to do (exit 2)."""

    label = "data error"


@dataclass(frozen=True)
class Unit:
    path: str
    format: str  # text (whole file = one document) | lines | jsonl | json | parquet | hf
    start: int = 0  # byte offset, row group or shard index
    end: int = -1  # byte offset (exclusive); -1 = to the end
    parts: int = 1  # hf: number of shards

    @property
    def key(self) -> str:
        return f"{self.path}|{self.format}|{self.start}|{self.end}|{self.parts}"


def _format_of(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = path.name.lower()
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith(".json"):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def expand_inputs(inputs: list[str], fmt: str = "auto") -> list[tuple[Path, str]]:
    """Files (and Hugging Face dataset directories) named by paths, directories and globs, sorted."""
    found: list[tuple[Path, str]] = []
    for spec in inputs:
        path = Path(spec)
        if any(c in spec for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(spec, recursive=True) if Path(m).is_file())
            if not matches:
                raise DataError(f"{spec}: the glob matches no files")
            matches = [m for m in matches if m.stat().st_size > 0]  # empty files found by a pattern: nothing to read
            if not matches:
                raise DataError(f"{spec}: every file the glob matches is empty")
            found += [(m, _format_of(m, fmt)) for m in matches]
        elif path.is_dir() and _is_hf_dir(path, fmt):
            found.append((path, "hf"))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                           and p.stat().st_size > 0)
            if fmt == "auto":
                files = [p for p in files if p.suffix.lower() in TEXT_SUFFIXES | {".jsonl", ".json", ".parquet"}]
            if not files:
                raise DataError(f"{spec}: the directory holds no input files")
            found += [(p, _format_of(p, fmt)) for p in files]
        elif path.is_file():
            if path.stat().st_size == 0:
                raise DataError(f"{path}: the file is empty; remove it from the inputs")
            found.append((path, _format_of(path, fmt)))
        elif fmt == "hf" or (fmt == "auto" and "/" in spec and not spec.startswith((".", "/"))):
            found.append((path, "hf"))  # a hub name such as "allenai/c4" (needs a network)
        else:
            raise DataError(f"{spec}: no such file or directory")
    for path, f in found:
        if f not in FORMATS[1:]:
            raise DataError(f"--format: '{f}' is not one of {', '.join(FORMATS)}")
    return found


def _is_hf_dir(path: Path, fmt: str) -> bool:
    return fmt == "hf" or (fmt == "auto" and ((path / "dataset_info.json").is_file()
                                              or (path / "dataset_dict.json").is_file()))


def list_units(inputs: list[str], fmt: str = "auto", unit_bytes: int = UNIT_BYTES, hf_split: str = "train"
               ) -> list[Unit]:
    units: list[Unit] = []
    for path, f in expand_inputs(inputs, fmt):
        if f in ("lines", "jsonl") and path.stat().st_size > unit_bytes:
            size = path.stat().st_size
            units += [Unit(str(path), f, s, min(s + unit_bytes, size)) for s in range(0, size, unit_bytes)]
        elif f == "parquet":
            import pyarrow.parquet as pq  # type: ignore[import-not-found]

            groups = pq.ParquetFile(path).num_row_groups
            units += [Unit(str(path), f, g, g + 1) for g in range(groups)]
        elif f == "hf":
            n_rows = len(_load_hf(str(path), hf_split))
            parts = max(1, min(64, n_rows // 20_000))
            units += [Unit(str(path), f, i, i + 1, parts) for i in range(parts)]
        else:
            units.append(Unit(str(path), f))
    return units


def source_fingerprint(units: list[Unit]) -> str:
    """Changes when an input file changes (path, size, modification time) or the unit list does."""
    h = hashlib.sha256()
    for u in units:
        p = Path(u.path)
        stat = f"{p.stat().st_size}:{p.stat().st_mtime_ns}" if p.exists() and p.is_file() else "dir"
        h.update(f"{u.key}|{stat}\n".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- reading


def _decode(raw: bytes, where: str, utf8_errors: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if utf8_errors == "replace":
            return raw.decode("utf-8", errors="replace")
        raise DataError(f"{where}: invalid UTF-8 at byte {e.start} ({e.reason}); fix the file or pass"
                        " --utf8-errors replace") from None


def _byte_lines(unit: Unit) -> Iterator[tuple[int, bytes]]:
    """(offset, line) for the lines that *start* in [start, end): adjacent ranges never share a line."""
    end = unit.end if unit.end >= 0 else os.path.getsize(unit.path)
    with open(unit.path, "rb") as f:
        offset = unit.start
        if offset > 0:
            f.seek(offset - 1)
            if f.read(1) != b"\n":  # mid-line: that line belongs to the previous range
                offset += len(f.readline())
        else:
            f.seek(0)
        while offset < end:
            line = f.readline()
            if not line:
                break
            yield offset, line
            offset += len(line)


def _text_of(record, field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with a '{field}' field, got {type(record).__name__}")
    if field not in record:
        keys = ", ".join(list(record)[:8])
        raise DataError(f"{where}: no '{field}' field (fields: {keys}); pass --text-field NAME")
    text = record[field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field '{field}' is {type(text).__name__}, not text; pass --text-field NAME")
    return text


def _load_hf(name: str, split: str):
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise DataError(f"{name}: Hugging Face inputs need the datasets package (pip install 'sdd_train[data]')"
                        ) from None
    if Path(name).is_dir():
        ds = datasets.load_from_disk(name)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{name}: no split '{split}' (splits: {', '.join(ds)}); pass --hf-split NAME")
            ds = ds[split]
        return ds
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as e:  # network, missing dataset, ...
        raise DataError(f"{name}: could not load from the Hugging Face hub ({type(e).__name__}: {e});"
                        " save it with datasets' save_to_disk where a network exists and pass the directory") from None


def iter_documents(unit: Unit, text_field: str = "text", utf8_errors: str = "fail", hf_split: str = "train"
                   ) -> Iterator[str]:
    """The documents of one unit, in file order; empty documents are skipped."""
    f = unit.format
    if f == "text":
        text = _decode(Path(unit.path).read_bytes(), unit.path, utf8_errors)
        if text:
            yield text
    elif f in ("lines", "jsonl"):
        for offset, raw in _byte_lines(unit):
            where = f"{unit.path} (byte {offset})"
            line = _decode(raw, where, utf8_errors).rstrip("\r\n")
            if not line.strip():
                continue
            if f == "lines":
                yield line
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg}); each line of a .jsonl file must be one object"
                                ) from None
            text = _text_of(record, text_field, where)
            if text:
                yield text
    elif f == "json":
        raw = _decode(Path(unit.path).read_bytes(), unit.path, utf8_errors)
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{unit.path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        records = data if isinstance(data, list) else data.get("data") if isinstance(data, dict) else None
        if not isinstance(records, list):
            raise DataError(f"{unit.path}: expected a JSON list of objects (or {{\"data\": [...]}})")
        for i, record in enumerate(records):
            text = _text_of(record, text_field, f"{unit.path} (record {i})")
            if text:
                yield text
    elif f == "parquet":
        import pyarrow.parquet as pq  # type: ignore[import-not-found]

        pf = pq.ParquetFile(unit.path)
        if text_field not in pf.schema_arrow.names:
            raise DataError(f"{unit.path}: no '{text_field}' column (columns: {', '.join(pf.schema_arrow.names)});"
                            " pass --text-field NAME")
        table = pf.read_row_group(unit.start, columns=[text_field])
        for text in table.column(text_field).to_pylist():
            if text:
                yield text
    elif f == "hf":
        ds = _load_hf(unit.path, hf_split)
        if text_field not in ds.column_names:
            raise DataError(f"{unit.path}: no '{text_field}' column (columns: {', '.join(ds.column_names)});"
                            " pass --text-field NAME")
        shard = ds.shard(unit.parts, unit.start, contiguous=True)
        for batch in shard.iter(batch_size=1000):
            for text in batch[text_field]:
                if text:
                    yield text
    else:
        raise DataError(f"{unit.path}: unknown format '{f}'")
