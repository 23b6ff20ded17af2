"""What arrives on a device: one record per text (or media file reference), with its provenance.

Every record gets an id, its arrival time, where it came from, the device's fingerprint and the
sha256 of its content the moment it is accepted; everything downstream (dedup, quality, store,
labels) works on this one shape.
"""

from __future__ import annotations

import hashlib
import reprlib
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

Modality = Literal["text", "image", "audio"]
# Metadata of a quarantine entry that stands for a whole inbox file no record could be read from (its
# text is the file's name): there is nothing to release, only the file to fix and drop in again.
FILE_STAND_IN = "inbox-file"


@dataclass(frozen=True)
class Record:
    """One arrived item. ``text`` holds the text, or the file path for image and audio records."""

    text: str
    source: str  # "inbox:<file>", "stdin", "http", "simulation:<round>"
    device: str  # the device's fingerprint (its device id)
    modality: Modality = "text"
    label: str | None = None  # a label that came with the record, if any
    metadata: dict[str, Any] = field(default_factory=dict)  # e.g. a media file's size and type
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    arrived_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    sha256: str = ""  # of the content (the text, or the referenced file's bytes); set by :func:`stamped`


def content_hash(text: str) -> str:
    """sha256 of a text's UTF-8 bytes, after trimming surrounding whitespace."""
    return hashlib.sha256(text.strip().encode()).hexdigest()


def stamped(record: Record, digest: str | None = None) -> Record:
    """The record with its content hash set (the text's, unless ``digest`` of a file is given)."""
    return replace(record, sha256=digest or content_hash(record.text))


def _short_repr() -> reprlib.Repr:
    limited = reprlib.Repr()  # keyword arguments need Python 3.12
    limited.maxlevel, limited.maxstring, limited.maxother = 4, 400, 400
    return limited


_SHORT = _short_repr()


def short_repr(value: object) -> str:
    """``repr(value)``, cut at 4 levels and 400 characters a string: safe on a hostile, deep value."""
    return _SHORT.repr(value)
