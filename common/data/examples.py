"""Read labelled or plain text from CSV, JSONL or TXT into :class:`Example` records.

Shapes accepted (the same as the shared BANKING77 and Tiny Shakespeare files):

* CSV with a header holding ``text`` and optionally a label column (``label``, ``category`` or
  ``intent``);
* JSONL, one object per line with ``text`` and optionally one of the same label keys;
* TXT, plain text cut into blocks at blank lines (a speaker's speech in Tiny Shakespeare); a file
  without blank lines gives one example per line.

``builtin`` and ``builtin-test`` name the project's own corpus (see :mod:`.builtin`).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fleetlora.common.errors import DataError

LABEL_KEYS = ("label", "category", "intent")
BUILTIN_SOURCES = ("builtin", "builtin-test")


@dataclass(frozen=True)
class Example:
    """One text, with its label when the task is classification."""

    text: str
    label: str | None = None


def load_examples(source: str | Path) -> list[Example]:
    """Load every example of ``source`` (a file path or a built-in corpus name).

    Raises :class:`DataError` naming the file and the problem when it is missing, empty or
    malformed; never returns an empty list.
    """
    if str(source) in BUILTIN_SOURCES:
        from fleetlora.common.data.builtin import builtin_examples

        return builtin_examples(split="train" if str(source) == "builtin" else "test")
    path = Path(source)
    if not path.is_file():
        raise DataError(f"Data file not found: {path} (give a CSV, JSONL or TXT file, or 'builtin').")
    readers = {".csv": _read_csv, ".jsonl": _read_jsonl, ".json": _read_jsonl, ".txt": _read_txt}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"Unsupported data file type {path.suffix!r} for {path}: use .csv, .jsonl or .txt.")
    try:
        examples = reader(path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text: {exc.reason} at byte {exc.start}.") from exc
    if not examples:
        raise DataError(f"{path} contains no examples: add at least one non-empty text.")
    labelled = sum(e.label is not None for e in examples)
    if 0 < labelled < len(examples):
        raise DataError(
            f"{path}: {len(examples) - labelled} of {len(examples)} examples have no label; "
            "label every example or none."
        )
    return examples


def _label_key(keys: Sequence[str]) -> str | None:
    return next((k for k in LABEL_KEYS if k in keys), None)


def _read_csv(path: Path) -> list[Example]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, strict=True)
        try:
            header = next(reader, None)
            if header is None:
                return []
            header = [h.strip().lower() for h in header]
            if "text" not in header:
                raise DataError(f"{path}: the CSV header {header} has no 'text' column.")
            text_at, label_key = header.index("text"), _label_key(header)
            label_at = header.index(label_key) if label_key else None
            examples = []
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{path}, line {reader.line_num}: {len(row)} fields where the header has "
                        f"{len(header)}; quote texts that contain commas."
                    )
                text = row[text_at].strip()
                if text:
                    label = row[label_at].strip() if label_at is not None else None
                    examples.append(Example(text, label or None))
        except csv.Error as exc:
            raise DataError(f"{path}, line {reader.line_num}: malformed CSV ({exc}).") from exc
    return examples


def _read_jsonl(path: Path) -> list[Example]:
    examples = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {number}: not valid JSON ({exc.msg}).") from exc
            except RecursionError:
                raise DataError(f"{path}, line {number}: nested too deep to be an example.") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{path}, line {number}: expected an object with a 'text' string.")
            label_key = _label_key(list(record))
            label = record[label_key] if label_key else None
            if isinstance(label, dict | list):  # str() of it would make a label no one meant
                raise DataError(f"{path}, line {number}: the label must be a string or a number, not JSON.")
            text = record["text"].strip()
            if text:
                examples.append(Example(text, None if label is None else str(label)))
    return examples


def _read_txt(path: Path) -> list[Example]:
    content = path.read_text(encoding="utf-8")
    blocks = [b.strip() for b in content.split("\n\n")]
    if len(blocks) <= 1:
        blocks = [line.strip() for line in content.splitlines()]
    return [Example(b) for b in blocks if b]


def labels_of(examples: Sequence[Example]) -> tuple[str, ...]:
    """Sorted distinct labels; empty when the examples are plain text."""
    return tuple(sorted({e.label for e in examples if e.label is not None}))


def split_holdout(examples: Sequence[Example], fraction: float = 0.2) -> tuple[list[Example], list[Example]]:
    """Split into (train, held-out) by a hash of the text.

    Hashing keeps an example on the same side as the corpus grows, so a device's held-out set
    never leaks into its training set from one round to the next.
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"Held-out fraction must be in [0, 1), got {fraction}.")
    train: list[Example] = []
    held_out: list[Example] = []
    for example in examples:
        bucket = int.from_bytes(hashlib.sha256(example.text.encode()).digest()[:4], "big") % 10_000
        (held_out if bucket < fraction * 10_000 else train).append(example)
    return train, held_out
