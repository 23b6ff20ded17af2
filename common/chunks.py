"""Opaque bytes (a sealed upload, an update package) in a Flower ArrayRecord, as uint8 chunks.

Chunks keep each array well under gRPC's message limits and let Flower stream large records.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import numpy as np
from flwr.app import Array, ArrayRecord

CHUNK_BYTES: Final = 4 * 2**20


def to_array_record(blob: bytes) -> ArrayRecord:
    view = memoryview(blob)
    return ArrayRecord(
        array_dict={
            f"chunk-{i:06d}": Array(np.frombuffer(view[start : start + CHUNK_BYTES], dtype=np.uint8))
            for i, start in enumerate(range(0, len(view), CHUNK_BYTES))
        }
    )


def from_array_record(record: Mapping[str, Array]) -> bytes:
    """The bytes :func:`to_array_record` split, joined in chunk order."""
    return b"".join(record[name].numpy().tobytes() for name in sorted(record))
