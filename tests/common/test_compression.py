import pytest
import zstandard

from fleetlora.common.compression import DecompressionError, compress, decompress

RAW = b"fleetlora " * 1000


def test_compressed_bytes_decompress_to_the_original():
    assert decompress(compress(RAW, level=3), max_bytes=len(RAW)) == RAW


def test_a_frame_declaring_more_than_the_bound_is_refused_before_inflating():
    with pytest.raises(DecompressionError, match="would inflate to 10000 bytes"):
        decompress(compress(RAW, level=3), max_bytes=len(RAW) - 1)


def test_a_frame_that_declares_no_size_is_cut_off_at_the_bound():
    # A streamed frame carries no content size: only max_output_size stops it.
    undeclared = zstandard.ZstdCompressor(write_content_size=False).compress(RAW)
    assert zstandard.frame_content_size(undeclared) == -1
    assert decompress(undeclared, max_bytes=len(RAW)) == RAW
    with pytest.raises(DecompressionError):
        decompress(undeclared, max_bytes=len(RAW) // 2)


@pytest.mark.parametrize("blob", [b"", b"not zstd at all"], ids=["empty", "text"])
def test_bytes_that_are_not_zstd_are_refused(blob: bytes):
    with pytest.raises(DecompressionError, match="not zstd data"):
        decompress(blob, max_bytes=1 << 20)
