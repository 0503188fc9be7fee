"""Training data: load and validate the texts GRACE trains on, split off a held-out set, batch them.

GRACE trains on two kinds of rows (grace.md section 5):

    supervised     {"query": ..., "positive": ..., "negative": ...}   negative optional (null/absent:
                                                                       in-batch negatives only)
    unsupervised   {"text": ...}                                      one text per row

The policy is trained on one prompt per row, the "main" text: the positive document (supervised)
or the text itself (unsupervised). That is `Example.text`; the query and the negative are only
embedded for the reward. Extra columns (e.g. GRACE's "source") are ignored.

Sources: a list of dicts, .jsonl/.json (JSON Lines, or a .json holding one JSON array of objects),
.parquet, .txt/.text (one text per line) or a directory written by `datasets`' save_to_disk.

Every row is validated before training starts. Problems are collected over the whole file and
raised as one DataError that says where they are, e.g.

    data.jsonl:7: field 'query': missing        (text formats: 1-based line numbers)
    data.parquet: row 6: field 'query': null     (parquet, datasets, lists, JSON arrays: 0-based rows)

With skip_bad_rows=True the bad rows are dropped with a warning and written to a rejects file.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

log = logging.getLogger(__name__)

MODES = ("auto", "supervised", "unsupervised")
ACCEPTED = (
    "a .jsonl/.json file (JSON Lines, or one JSON array of objects), a .parquet file, "
    "a .txt/.text file (one text per line), a directory saved by datasets' save_to_disk, "
    "or a list of dicts"
)
DATASETS_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")
SHOW_BAD_ROWS = 5  # bad rows quoted in an error message
RAW_CHARS = 500  # characters of a rejected row kept in the rejects file


@dataclass(frozen=True)
class Example:
    """One training prompt. `text` is what the policy is trained on (positive document or text)."""

    text: str
    query: str | None = None  # supervised only
    negative: str | None = None  # optional hard negative (supervised)


class DataError(ValueError):
    """A problem with the training data or the data settings; the message says what and where."""


# -----------------------------------------------------------------------------
# Reading: every source becomes one stream of _Row, whatever its format


@dataclass
class _Row:
    where: int  # 1-based line number (text formats) or 0-based row index
    value: object = None  # the parsed row, normally a dict
    raw: str | None = None  # the raw line, for the rejects file (None: dump `value` instead)
    problem: str | None = None  # found while reading: invalid UTF-8, malformed JSON
    blank: bool = False  # a blank line: skipped and counted, never an error


@dataclass
class _Source:
    name: str  # the path as given, or "<rows>" for a list
    unit: str  # "line" or "row": how rows are addressed in messages and in the rejects file
    rows: Iterable[_Row]
    plain_text: bool = False  # a .txt file: one unsupervised text per line

    def where(self, row: _Row) -> str:
        return f"{self.name}:{row.where}" if self.unit == "line" else f"{self.name}: row {row.where}"


def _decode(line: bytes) -> tuple[str | None, str | None]:
    """(text, None) for valid UTF-8, else (None, what is wrong)."""
    try:
        return line.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, f"invalid UTF-8 (byte 0x{line[e.start]:02x} at byte {e.start + 1} of the line)"


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line without its line ending), read as bytes so bad UTF-8 is per line."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
            yield lineno, line.rstrip(b"\r\n")


def _read_lines(path: Path, as_json: bool) -> Iterator[_Row]:
    """One row per line: a JSON value (.jsonl) or {"text": line} (.txt); blank lines are marked as such."""
    for lineno, line in _lines(path):
        text, problem = _decode(line)
        if text is not None and not text.strip():
            yield _Row(lineno, blank=True)
            continue
        value = None
        if problem is None and not as_json:
            value = {"text": text}
        elif problem is None:
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                problem = f"malformed JSON ({e.msg} at column {e.colno})"
        raw = text if text is not None else line.decode("utf-8", errors="backslashreplace")
        yield _Row(lineno, value, raw, problem)


def _holds_json_array(path: Path) -> bool:
    """Whether a .json file is one JSON array (first non-blank character is '[')."""
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    return head.startswith(b"[")


def _read_json_array(path: Path) -> list[_Row]:
    """A .json file holding one array of objects. It is one JSON document, so a syntax error
    or bad UTF-8 anywhere makes the whole file unreadable (no row can be skipped)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 (byte 0x{data[e.start]:02x})") from None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno}); a .json file must "
            "hold JSON Lines or one JSON array of objects"
        ) from None
    return [_Row(i, value) for i, value in enumerate(values)]


def _arrow_rows(tables) -> Iterator[_Row]:
    """Rows (0-based) from an iterable of pyarrow tables or record batches."""
    index = 0
    for table in tables:
        for value in table.to_pylist():
            yield _Row(index, value)
            index += 1


def _read_parquet(path: Path) -> Iterator[_Row]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    return _arrow_rows(parquet.iter_batches(batch_size=8192))


def _read_datasets_dir(path: Path) -> Iterator[_Row]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as e:  # whatever went wrong inside `datasets`, say which directory
        raise DataError(f"{path}: could not load this datasets directory ({type(e).__name__}: {e})") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise DataError(f"{path}: a DatasetDict with splits {sorted(dataset)} but no 'train' split")
        dataset = dataset["train"]
    return _arrow_rows(dataset.with_format("arrow").iter(batch_size=8192))


def _open_source(source) -> _Source:
    """Pick the reader for `source`, or say what was found and what is accepted."""
    if isinstance(source, list):
        return _Source("<rows>", "row", (_Row(i, value) for i, value in enumerate(source)))
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(f"cannot load training data from a {type(source).__name__}; expected {ACCEPTED}")
    path, name = Path(source), str(source)
    if not path.exists():
        raise DataError(f"{name}: no such file or directory; expected {ACCEPTED}")
    if path.is_dir():
        if not any((path / marker).exists() for marker in DATASETS_MARKERS):
            raise DataError(
                f"{name}: a directory, but not one saved by datasets' save_to_disk (it has no "
                f"{', '.join(DATASETS_MARKERS)}); expected {ACCEPTED}"
            )
        return _Source(name, "row", _read_datasets_dir(path))
    ext = path.suffix.lower()
    if ext == ".json" and _holds_json_array(path):
        return _Source(name, "row", _read_json_array(path))
    if ext in (".jsonl", ".json"):
        return _Source(name, "line", _read_lines(path, as_json=True))
    if ext == ".parquet":
        return _Source(name, "row", _read_parquet(path))
    if ext in (".txt", ".text"):
        return _Source(name, "line", _read_lines(path, as_json=False), plain_text=True)
    raise DataError(f"{name}: unknown file type {ext or '(no extension)'!r}; expected {ACCEPTED}")


# -----------------------------------------------------------------------------
# Validation: decide the mode, then turn each row into an Example or a reason it is bad


class _BadRow(Exception):
    """Why one row cannot be used (becomes one line of the DataError, or of the rejects file)."""


def _type_name(value) -> str:
    """A JSON-flavoured name for a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _row_kind(value) -> str | None:
    """'supervised' (query+positive) or 'unsupervised' (text) when a row's columns say so."""
    if not isinstance(value, dict):
        return None
    if "query" in value and "positive" in value:
        return "supervised"
    if "text" in value:
        return "unsupervised"
    return None


def _resolve_mode(rows: Iterator[_Row], mode: str, source: _Source) -> tuple[str, str, str, list[_Row]]:
    """Read rows until one decides the mode (the first object with query+positive or text).

    Returns (mode, the column Example.text comes from, where it was decided, the rows read so
    far). With no object row at all every row is bad anyway, and `mode` comes back unresolved.
    """
    read, columns, saw_object = [], set(), False
    for row in rows:
        read.append(row)
        if row.problem or not isinstance(row.value, dict):
            continue
        saw_object = True
        columns.update(str(column) for column in row.value)
        where, kind = source.where(row), _row_kind(row.value)
        if mode == "unsupervised" and ("text" in row.value or "positive" in row.value):
            # A supervised file used as unsupervised data: its positive documents are the texts.
            return mode, "text" if "text" in row.value else "positive", where, read
        if mode in ("auto", "supervised") and kind is not None:
            if mode == "supervised" and kind == "unsupervised":
                raise DataError(
                    f"{where}: mode='supervised' needs 'query' and 'positive' columns, but this row "
                    f"has {sorted(map(str, row.value))}; use mode='unsupervised' or 'auto' for 'text' rows"
                )
            return kind, "positive" if kind == "supervised" else "text", where, read
    if saw_object:
        expected = {
            "auto": "'query' and 'positive' (supervised) or 'text' (unsupervised)",
            "supervised": "'query' and 'positive'",
            "unsupervised": "'text' (or 'positive', from a supervised file)",
        }[mode]
        raise DataError(
            f"{source.name}: no row has the columns mode='{mode}' needs; "
            f"columns seen: {sorted(columns)[:20]}; expected {expected}"
        )
    return mode, "text", "", read


@dataclass
class _Validator:
    """Turns one row into an Example, or raises _BadRow with every problem the row has."""

    mode: str
    text_column: str  # where Example.text comes from: "positive" or "text"
    decided_at: str  # the row that decided the mode, for mixed-mode messages
    max_chars: int
    truncated: int = 0  # rows with a text longer than max_chars (cut, not rejected)
    empty_negatives: int = 0  # "" negatives, treated as no negative

    def example(self, row) -> Example:
        if not isinstance(row, dict):
            raise _BadRow(f"expected a JSON object, got {_type_name(row)}")
        needed = ["query", "positive"] if self.mode == "supervised" else [self.text_column]
        other = "text" if self.text_column == "positive" else "positive"  # the other layout's main column
        if self.text_column not in row and other in row:
            raise _BadRow(
                f"mixed modes: this row has columns {sorted(map(str, row))}, but the file is "
                f"{self.mode} (decided by {self.decided_at}), which needs {needed}"
            )
        problems = []
        for column in needed:
            if problem := self._problem(row, column):
                problems.append(f"field '{column}': {problem}")
        negative = row.get("negative") if self.mode == "supervised" else None
        if isinstance(negative, str) and not negative.strip():
            self.empty_negatives += 1
            negative = None
        elif negative is not None and (problem := self._problem(row, "negative")):
            problems.append(f"field 'negative': {problem}")
        if problems:
            raise _BadRow("; ".join(problems))
        texts = [row[column] for column in needed] + [negative]
        if any(text is not None and len(text) > self.max_chars for text in texts):
            self.truncated += 1
        cut = [None if text is None else text[: self.max_chars] for text in texts]
        if self.mode == "supervised":
            query, positive, negative = cut
            return Example(text=positive, query=query, negative=negative)
        return Example(text=cut[0])

    @staticmethod
    def _problem(row: dict, column: str) -> str | None:
        """What is wrong with one required text field, or None."""
        if column not in row:
            return "missing"
        value = row[column]
        if not isinstance(value, str):
            return "null" if value is None else f"expected a string, got {_type_name(value)}"
        if not value.strip():
            return "empty" if not value else "whitespace only"
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # e.g. a JSON "\ud800" escape: a lone surrogate
                return "not valid Unicode (an unpaired surrogate)"
        return None


def _bad_rows_message(source: _Source, bad: list[tuple[_Row, str]], total: int) -> str:
    shown = "\n".join(f"  {source.where(row)}: {reason}" for row, reason in bad[:SHOW_BAD_ROWS])
    if len(bad) > SHOW_BAD_ROWS:
        shown += f"\n  ... and {len(bad) - SHOW_BAD_ROWS} more"
    if len(bad) == total:
        return f"{source.name}: all {total} rows are bad, nothing to train on:\n{shown}"
    return (
        f"{source.name}: {len(bad)} of {total} rows are bad:\n{shown}\n"
        f"Fix them, or pass --skip-bad-rows (skip_bad_rows=True) to train on the other "
        f"{total - len(bad)} rows and write the bad ones to a rejects file."
    )


def _write_rejects(path: str, source: _Source, bad: list[tuple[_Row, str]]) -> None:
    """One JSON line per rejected row: {"line" or "row": n, "reason": ..., "raw": ...}."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", errors="backslashreplace") as f:
        for row, reason in bad:
            raw = row.raw if row.raw is not None else json.dumps(row.value, ensure_ascii=False, default=repr)
            record = {source.unit: row.where, "reason": reason, "raw": raw[:RAW_CHARS]}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _open_for(source, mode: str) -> _Source:
    opened = _open_source(source)
    if opened.plain_text and mode == "supervised":
        raise DataError(
            f"{opened.name}: a text file holds one unsupervised text per line; mode='supervised' "
            "needs query/positive rows (.jsonl/.json/.parquet/datasets directory)"
        )
    return opened


def check_source(source: str | os.PathLike, mode: str = "auto") -> None:
    """Raise the DataError that load_examples would for a source with nothing to train on, reading rows only
    up to the first usable one: a missing path, an unknown file type, a directory that datasets did not save,
    an empty file, no row with the columns `mode` needs. Bad rows further on are found when it loads."""
    opened = _open_for(source, mode)
    rows = (row for row in opened.rows if not row.blank)
    first = next(rows, None)
    if first is None:
        raise DataError(f"{opened.name}: no training data (no rows at all, or only blank lines)")
    if not opened.plain_text:
        _resolve_mode(itertools.chain([first], rows), mode, opened)


def load_examples(
    source: str | os.PathLike | list[dict],
    mode: str = "auto",
    *,
    skip_bad_rows: bool = False,
    rejects_path: str | None = None,
    max_chars: int = 20_000,
) -> tuple[list[Example], str]:
    """Load and validate training rows; returns (examples, mode) with mode resolved.

    mode="auto" decides from the first row with usable columns: query+positive -> "supervised",
    text -> "unsupervised". mode="supervised" needs query+positive in every row. mode="unsupervised"
    takes "text", or, given a supervised file, its "positive" documents (queries and negatives are
    dropped). Texts longer than max_chars are cut to max_chars (with a warning). Any bad row is a
    DataError unless skip_bad_rows, which drops bad rows with a warning and writes them to
    rejects_path (if given). No usable row at all is always a DataError.
    """
    if mode not in MODES:
        raise DataError(f"unknown data mode {mode!r}; expected one of {list(MODES)}")
    if not isinstance(max_chars, int) or max_chars < 1:
        raise DataError(f"max_chars must be a positive integer, got {max_chars!r}")
    source = _open_for(source, mode)
    rows = iter(source.rows)
    mode, text_column, decided_at, read = _resolve_mode(rows, mode, source)
    validator = _Validator(mode, text_column, decided_at, max_chars)

    examples, bad, blank_lines, total = [], [], 0, 0
    for row in itertools.chain(read, rows):
        if row.blank:
            blank_lines += 1
            continue
        total += 1
        try:
            if row.problem:
                raise _BadRow(row.problem)
            examples.append(validator.example(row.value))
        except _BadRow as e:
            bad.append((row, str(e)))

    if blank_lines:
        log.info("%s: skipped %d blank lines", source.name, blank_lines)
    if total == 0:
        found = f"only {blank_lines} blank lines" if blank_lines else "no rows at all"
        raise DataError(f"{source.name}: no training data ({found})")
    if bad and not skip_bad_rows:
        raise DataError(_bad_rows_message(source, bad, total))
    if skip_bad_rows and rejects_path is not None:
        _write_rejects(rejects_path, source, bad)  # written even when empty, so it is never stale
    if not examples:
        raise DataError(_bad_rows_message(source, bad, total))
    if bad:
        to = f"; wrote them to {rejects_path}" if rejects_path else ""
        warnings.warn(f"{source.name}: skipped {len(bad)} bad rows (of {total}){to}", stacklevel=2)
    if validator.truncated:
        warnings.warn(
            f"{source.name}: {validator.truncated} rows had a text longer than max_chars={max_chars}; "
            f"cut to {max_chars} characters",
            stacklevel=2,
        )
    if validator.empty_negatives:
        log.info("%s: %d rows have an empty negative; they get in-batch negatives only",
                 source.name, validator.empty_negatives)
    log.info("%s: %d %s examples", source.name, len(examples), mode)
    return examples, mode


# -----------------------------------------------------------------------------
# Held-out split and batching


def split_heldout(
    examples: list[Example], fraction: float, seed: int, max_heldout: int = 500
) -> tuple[list[Example], list[Example]]:
    """A seeded random held-out set: returns (train, heldout), each in the original order.

    heldout has round(fraction * n) examples, at least 1 when fraction > 0, at most max_heldout.
    """
    if not 0 <= fraction < 1:
        raise DataError(f"held-out fraction must be in [0, 1), got {fraction}")
    n = len(examples)
    size = min(max_heldout, max(1, round(fraction * n))) if fraction > 0 else 0
    if size >= n:
        raise DataError(f"cannot hold out {size} of {n} examples and still have some to train on")
    heldout = np.zeros(n, dtype=bool)
    heldout[np.random.default_rng(seed).permutation(n)[:size]] = True
    train = [example for example, held in zip(examples, heldout) if not held]
    return train, [example for example, held in zip(examples, heldout) if held]


class PromptBatches:
    """Endless batches of `batch_size` examples: reshuffled every epoch, last partial batch dropped.

    Epoch e visits the examples in the order of a permutation drawn from numpy's RNG seeded with
    seed + e, so the stream depends only on (examples, batch_size, seed), and (epoch, position)
    is all a checkpoint needs to continue with the exact same next batch.
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int):
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        if batch_size > len(examples):
            raise DataError(
                f"batch_size={batch_size} is larger than the {len(examples)} training examples; "
                "use a smaller batch size or more data"
            )
        if seed < 0:
            raise DataError(f"seed must be non-negative, got {seed}")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.seed = seed
        self._epoch = 0  # epoch of the most recent batch
        self._position = 0  # batches already taken from that epoch
        self._order_epoch, self._order = -1, None  # the cached permutation and its epoch

    @property
    def epoch(self) -> int:
        """Epoch of the most recently returned batch (0 before the first)."""
        return self._epoch

    @property
    def steps_per_epoch(self) -> int:
        return len(self.examples) // self.batch_size

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = np.random.default_rng(self.seed + epoch).permutation(len(self.examples))
            self._order_epoch = epoch
        return self._order

    def __iter__(self) -> PromptBatches:
        return self

    def __next__(self) -> list[Example]:
        if self._position == self.steps_per_epoch:
            self._epoch, self._position = self._epoch + 1, 0
        start = self._position * self.batch_size
        indices = self._permutation(self._epoch)[start : start + self.batch_size]
        self._position += 1
        return [self.examples[i] for i in indices]

    def state_dict(self) -> dict:
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_examples": len(self.examples),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` left off; refuse if the stream it came from was a different one."""
        ours = {"seed": self.seed, "batch_size": self.batch_size, "num_examples": len(self.examples)}
        for key, value in ours.items():
            if key in state and state[key] != value:
                raise DataError(
                    f"cannot resume the batches: the checkpoint has {key}={state[key]}, this run {value}"
                )
        if not 0 <= state["position"] <= self.steps_per_epoch or state["epoch"] < 0:
            raise DataError(f"cannot resume the batches: bad epoch/position in {state}")
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
