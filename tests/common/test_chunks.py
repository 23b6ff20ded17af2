"""Opaque bytes in chunked ArrayRecords: joined back exactly, the np.save header read without np.load."""

import io
import os

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fleetlora.common import chunks


@pytest.mark.parametrize("size", [0, 1, 63, 64, 382_444, chunks.CHUNK_BYTES, 2 * chunks.CHUNK_BYTES + 17])
def test_bytes_come_back_exactly_each_chunk_as_a_view_of_its_npy_data(size: int):
    blob = os.urandom(size)
    record = chunks.bytes_to_array_record(blob)
    assert chunks.array_record_to_bytes(record) == blob
    assert all(isinstance(chunks._chunk_bytes(array), memoryview) for array in record.values())


def _npy(array: np.ndarray, version: tuple[int, int] = (1, 0)) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=version, allow_pickle=False)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data",
    [
        _npy(np.arange(12, dtype=np.float32)),  # another dtype: its bytes, as np.load gives them
        _npy(np.arange(6, dtype=np.uint8).reshape(2, 3)),  # not 1-D
        _npy(np.arange(6, dtype=np.uint8), version=(2, 0)),  # another header version
        _npy(np.arange(6, dtype=np.uint8)) + b"trailing",  # more bytes than the header declares
    ],
    ids=["float32", "2-d", "npy-2.0", "trailing-bytes"],
)
def test_any_other_chunk_joins_as_np_load_reads_it(data: bytes):
    array = Array(dtype="uint8", shape=(len(data),), stype="numpy.ndarray", data=data)
    assert not isinstance(chunks._chunk_bytes(array), memoryview)
    assert chunks.array_record_to_bytes(ArrayRecord({"chunk-000000": array})) == array.numpy().tobytes()


def test_a_chunk_shorter_than_its_header_declares_is_refused_as_before():
    data = _npy(np.arange(6, dtype=np.uint8))[:-1]
    array = Array(dtype="uint8", shape=(6,), stype="numpy.ndarray", data=data)
    with pytest.raises(ValueError):
        chunks.array_record_to_bytes(ArrayRecord({"chunk-000000": array}))


def _header(header: bytes) -> bytes:
    """A version 1.0 ``.npy`` header around ``header``, padded as np.save pads it."""
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


def _npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, chunk=np.arange(3, dtype=np.uint8))
    return buffer.getvalue()


_U1 = b"{'descr': '|u1', 'fortran_order': False, 'shape': "


@pytest.mark.parametrize(
    "data",
    [
        b"",  # np.load: EOFError
        b"PK\x03\x04" + bytes(60),  # zip magic: zipfile.BadZipFile
        _npz(),  # a whole .npz archive: np.load gives an NpzFile, which has no tobytes
        _header(_U1 + b"(1000000000000,), }") + b"abc",  # 931 GiB: MemoryError
        _header(_U1 + b"(10000000000000000000000,), }"),  # past int64: OverflowError
        _header(_U1 + b"(3,"),  # cut short: tokenize.TokenError
        _header(_U1 + b"(03,), }") + b"abc",  # not a Python literal: np.load's ValueError
    ],
    ids=["empty", "zip-magic", "npz", "huge-shape", "shape-past-int64", "cut-header", "leading-zero"],
)
def test_a_hostile_chunk_is_refused_as_a_value_error(data: bytes):
    # A sealed upload's chunks are joined before its signature is checked (common.envelope.from_records,
    # which turns a ValueError into the reply's drop): whatever np.load raises on them must be one.
    array = Array(dtype="uint8", shape=(len(data),), stype="numpy.ndarray", data=data)
    with pytest.raises(ValueError):
        chunks.array_record_to_bytes(ArrayRecord({"chunk-000000": array}))
