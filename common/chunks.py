"""Opaque bytes (a sealed upload, an update package) in a Flower ArrayRecord, as uint8 chunks.

Chunks keep each array well under gRPC's message limits and let Flower stream large records. (Tensors
travel as arrays of their own: :func:`fleetlora.common.delta.to_array_record`.)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

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
    return b"".join(_chunk_bytes(record[name]) for name in sorted(record))


# What np.save writes before a 1-D uint8 array's bytes (format 1.0): magic, header length, header
# padded with 1 to 64 spaces (np.load accepts this and more; the rest goes through it). The length is a
# Python literal to np.load, so never written with a leading zero.
_NPY_UINT8 = re.compile(
    rb"\x93NUMPY\x01\x00(..)\{'descr': '\|u1', 'fortran_order': False, 'shape': \((0|[1-9]\d{0,11}),\), \} "
    rb"{1,64}\n",
    re.DOTALL,
)


def _chunk_bytes(array: Array) -> memoryview | bytes:
    """One chunk's bytes: a view of the ``.npy`` data past its header when the header is exactly what
    :func:`bytes_to_array_record` writes, sparing ``np.load``'s header parse and two copies (most of
    joining a sealed upload); anything else goes through ``np.load``, as before, and whatever that raises
    on hostile bytes (EOFError, zipfile.BadZipFile, OverflowError, MemoryError for a declared shape of
    terabytes, a tokenizer's error, an .npz archive loaded whole) is a ValueError: the chunks of a sealed
    upload are joined before its signature is checked (common.envelope.from_records)."""
    data = array.data
    if array.stype == SType.NUMPY and (header := _NPY_UINT8.match(data)):
        start = header.end()
        length = int.from_bytes(header.group(1), "little")
        if start == 10 + length and len(data) - start == int(header.group(2)):
            return memoryview(data)[start:]
    try:
        values = array.numpy()
    except Exception as exc:  # np.load's errors on bytes it cannot read are of many kinds
        raise ValueError(f"chunk is not a .npy array ({type(exc).__name__}: {exc})") from None
    if not isinstance(values, np.ndarray):
        raise ValueError(f"chunk is not a .npy array (it loads as {type(values).__name__})")
    return values.tobytes()
