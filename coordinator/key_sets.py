"""Reading a key-knowledge file: hostile input, checked before anything of it is stored.

A key set is what the fleet must not forget (coordinator/retention.py): a CSV with a header holding
``text`` and a label column, or JSONL objects with ``text`` and a label, read by the same loaders as
training data (:func:`fleetlora.common.data.load_examples`). Checked in this order, each with an
error that says what to fix: the file is a regular file of a known type and at most
:data:`MAX_BYTES` (by its size, before a byte is read), it parses, it holds 1 to
:data:`MAX_EXAMPLES` examples, every example is labelled or none is (an unlabelled set only
scores a causal-LM fleet), and no text comes with two labels (a repeated row is kept). Whether the
labels are the fleet's is checked where the fleet is known: when it is stored
(:meth:`KeySetStore.add`, against the tenant's lineages) and when a run scores it.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path

from fleetlora.common.data import Example, load_examples
from fleetlora.common.errors import DataError

# Every new version is scored on the whole set at the coordinator, so its size is paid each round:
# 20,000 texts are about 6.5 times the BANKING77 test set (3,080).
MAX_EXAMPLES = 20_000
MAX_BYTES = 8 * 2**20  # 8 MiB of file: ample for 20,000 short texts
SUFFIXES = (".csv", ".jsonl", ".json")


@dataclass(frozen=True)
class KeySetFile:
    """A checked key-set file: its examples and the name it is listed under."""

    name: str
    examples: list[Example]


def read_key_set(path: Path, name: str | None = None) -> KeySetFile:
    """The examples of the key-set file at ``path``, every check above passed (:class:`DataError`)."""
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(
            f"{path}: a key set is a .csv (text,label columns) or .jsonl file (text and label keys), "
            f"not {path.suffix or 'a file without a suffix'}."
        )
    try:
        info = path.stat()
    except OSError as exc:
        raise DataError(f"Cannot read the key set {path}: {exc.strerror}.") from None
    if not stat.S_ISREG(info.st_mode):
        raise DataError(f"{path} is not a regular file: give the key set as a .csv or .jsonl file.")
    if info.st_size > MAX_BYTES:
        raise DataError(
            f"{path} is {info.st_size / 2**20:.1f} MiB; a key set is at most {MAX_BYTES // 2**20} MiB "
            f"({MAX_EXAMPLES} examples): keep the examples the fleet must not forget."
        )
    examples = load_examples(path)  # DataError naming the line for what does not parse, or empty
    if len(examples) > MAX_EXAMPLES:
        raise DataError(
            f"{path} holds {len(examples)} examples; a key set is at most {MAX_EXAMPLES}, each scored "
            "every round: keep the examples the fleet must not forget."
        )
    answers: dict[str, set[str | None]] = {}
    for example in examples:
        answers.setdefault(example.text, set()).add(example.label)
    for text, labels in answers.items():
        if len(labels) > 1:  # no version could score it all: the gate would compare noise
            raise DataError(
                f"{path}: the text {text[:80]!r} appears with {len(labels)} labels "
                f"({', '.join(sorted(map(repr, labels)))}); a key set gives one answer per text: keep one."
            )
    return KeySetFile(name=(name or path.name).strip() or path.name, examples=examples)
