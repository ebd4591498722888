"""Reading local task files (JSONL or Parquet) with errors that name the file, the line (or row) and the field,
and the hash split shared by the file-based tasks (deepmath.py, poetry.py)."""
from __future__ import annotations

import hashlib
import json
import math
import unicodedata
from decimal import Decimal
from pathlib import Path
from typing import Any

# pyarrow's names of the float types narrower than Python's float.
NARROW_FLOATS = ("halffloat", "float")


def read_records(path: str | Path, columns: tuple[str, ...] = (),
                 text_columns: tuple[str, ...] = ()) -> list[tuple[str, dict[str, Any]]]:
    """(where, record) for every row of a local .jsonl or .parquet file, in file order. `where` locates the row
    for error messages: "file:LINE" for JSONL (1-based line number), "file: row N" for Parquet (0-based, as
    pyarrow and pandas number rows). `columns`, if given, are the only Parquet columns read (the others, such as
    long solutions, can be large); JSONL rows are returned whole. Blank JSONL lines are skipped; anything else
    that is not a JSON object is a ValueError, and so is a key given twice on one line (json keeps the last,
    silently). A Parquet column in `text_columns` (read as text, such as an answer) stored as 16- or 32-bit floats
    is refused: its numbers come back with other digits (1234.5678 as 1234.5677490234375)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{path}: no such file")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        records = _read_jsonl(path)
    elif suffix == ".parquet":
        records = _read_parquet(path, columns, text_columns)
    else:
        raise ValueError(f"{path}: unsupported file type {p.suffix!r}; use .jsonl or .parquet")
    if not records:
        raise ValueError(f"{path}: the file holds no rows")
    return records


def _read_jsonl(path) -> list[tuple[str, dict[str, Any]]]:
    records = []
    # Binary, decoded line by line, so that bad UTF-8 is reported with its line number.
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                # a byte-order mark opening the file (Windows editors write one) as the YAML reader takes it
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{where}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                # Python's json reads NaN and Infinity, which JSON does not have: a NaN difficulty passed every
                # difficulty filter, and an Infinity answer became the gold "inf".
                record = json.loads(line.rstrip("\r\n"), parse_constant=lambda name: _not_json(where, name),
                                    object_pairs_hook=lambda pairs: _object(where, pairs), parse_float=JsonFloat)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            except RecordError:
                raise
            except (ValueError, RecursionError) as e:  # an integer of over 4300 digits; nesting deeper than Python's stack
                raise ValueError(f"{where}: not a JSON record this reader takes ({type(e).__name__}: "
                                 f"{str(e)[:120]})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            records.append((where, record))
    return records


class JsonFloat(float):
    """A JSON number with a fraction or exponent, with the text it was written as: a float holds 17 significant
    digits, and an answer written with more (18446744073709551616.0) became another number (found by review)."""

    def __new__(cls, text: str):
        self = super().__new__(cls, text)
        self.text = text
        return self


class RecordError(ValueError):
    """A row that is JSON but not a record this reader takes; the message names the file and line."""


def _not_json(where: str, name: str):
    raise RecordError(f"{where}: {name} is not a JSON number (JSON has no NaN or Infinity)")


def _object(where: str, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record = dict(pairs)
    if len(record) < len(pairs):
        twice = next(k for i, (k, _) in enumerate(pairs) if any(k == other for other, _ in pairs[:i]))
        raise RecordError(f"{where}: key {twice!r} is given twice (JSON readers keep one of them)")
    return record


def _read_parquet(path, columns: tuple[str, ...], text_columns: tuple[str, ...]) -> list[tuple[str, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq  # optional: only Parquet input needs it
    except ImportError:  # a ValueError: the trainer reports it as one line, like any other bad input
        raise ValueError(
            f"{path}: reading Parquet files needs pyarrow, which is not installed. "
            "Install it with `pip install 'raro-fast[parquet]'` (or `pip install pyarrow`), or convert the file to JSONL."
        ) from None
    try:
        parquet_file = pq.ParquetFile(path)
        schema = parquet_file.schema_arrow
        present = set(schema.names)
        types = {c: str(schema.field(c).type) for c in text_columns if c in present}
        narrow = [(c, t) for c, t in types.items() if t in NARROW_FLOATS]
        if not narrow:
            wanted = [c for c in columns if c in present] if columns else None
            rows = parquet_file.read(columns=wanted).to_pylist()
    except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError, ...) for one cause: a bad file
        raise ValueError(f"{path}: cannot read as Parquet ({e})") from None
    if narrow:
        name, arrow_type = narrow[0]
        raise ValueError(f"{path}: column {name!r} holds {arrow_type} (16/32-bit) numbers, whose text has other "
                         f"digits (1234.5678 reads back as 1234.5677490234375); store it as text or as double")
    return [(f"{path}: row {i}", row) for i, row in enumerate(rows)]


def text_field(record: dict[str, Any], where: str, name: str, *, allow_numbers: bool = False) -> str:
    """record[name] as a non-empty string, else a ValueError naming the row and the field. With `allow_numbers`,
    an int or float (a final answer like 42) is taken as its text."""
    if record.get(name) is None:
        raise ValueError(f"{where}: field {name!r} missing")
    value = record[name]
    if allow_numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):  # an int is finite (isfinite overflowed on a big one)
            raise ValueError(f"{where}: field {name!r} is {value}, not a finite number")
        # Positional, never an exponent: str(0.00001) is "1e-05", which math-verify reads as e - 5. A JSON number keeps
        # every digit it was written with.
        value = str(value) if isinstance(value, int) else format(Decimal(getattr(value, "text", repr(value))), "f")
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{where}: field {name!r} is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate (JSON's "\ud800"): it failed later, in a hash, unnamed
        raise ValueError(f"{where}: field {name!r} holds {value[e.start:e.end]!r}, not a character") from None
    return value


def repeat_key(text: str) -> str:
    """What two rows are compared by for repeats: their words, whatever the spacing and invisible format characters
    (a zero-width space, a byte-order mark: review). A copy that differs in those alone could be held out by the
    split while the other is trained on."""
    return " ".join("".join(ch for ch in text if unicodedata.category(ch) != "Cf").split())


def in_heldout(key: str, fraction: float, seed: int) -> bool:
    """Whether the row keyed `key` is held out: a uniform draw from the key's hash (not Python's salted hash()),
    so the same in every run and independent of every other row."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def stable_id(prefix: str, key: str) -> str:
    return f"{prefix}:{hashlib.sha256(key.encode()).hexdigest()[:16]}"


# ---------------------------------------------------------------------------------------------------------------
# Loading DeepMath rows.


def hash_split(examples: list, *, max_examples: int, heldout_fraction: float, seed: int, path, fraction_setting: str,
               key=lambda ex: ex.question) -> dict:
    """{"train": [...], "heldout": [...]}: the first `max_examples` (0: all) split by `in_heldout` on `key(ex)` (the
    question). An empty training split is an error naming the file and the setting to change."""
    if max_examples:
        examples = examples[:max_examples]
    splits: dict[str, list] = {"train": [], "heldout": []}
    for ex in examples:
        splits["heldout" if in_heldout(key(ex), heldout_fraction, seed) else "train"].append(ex)
    if not splits["train"]:
        raise ValueError(f"{path}: all {len(examples)} examples fell in the held-out split; "
                         f"use more examples or a smaller {fraction_setting}")
    return splits
