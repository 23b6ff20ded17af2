"""Opaque bytes (a sealed upload, an update package) in a Flower ArrayRecord, as uint8 chunks.

Chunks keep each array well under gRPC's message limits and let Flower stream large records. (Tensors
travel as arrays of their own: :func:`fleetlora.common.delta.to_array_record`.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import numpy as np
from flwr.app import Array, ArrayRecord

CHUNK_BYTES: Final = 4 * 2**20


def bytes_to_array_record(blob: bytes) -> ArrayRecord:
    """``blob`` as uint8 arrays of at most :data:`CHUNK_BYTES`, named so that name order is byte order."""
    view = memoryview(blob)
    return ArrayRecord(
        array_dict={
            f"chunk-{i:06d}": Array(np.frombuffer(view[start : start + CHUNK_BYTES], dtype=np.uint8))
            for i, start in enumerate(range(0, len(view), CHUNK_BYTES))
        }
    )


def array_record_to_bytes(record: Mapping[str, Array]) -> bytes:
    """The bytes :func:`bytes_to_array_record` split, joined in chunk order."""
    return b"".join(record[name].numpy().tobytes() for name in sorted(record))
