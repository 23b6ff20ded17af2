"""zstd with a bound: the one place untrusted compressed bytes are inflated.

A zstd frame a few KiB long can declare, and inflate to, gigabytes. Every reader of compressed bytes
(update packages, sealed uploads, a corpus store's cold blocks) goes through :func:`decompress`, which
refuses to produce more than the caller's ``max_bytes``: a frame that declares a larger size is refused
before any output is made, and one that declares none is cut off at the bound.
"""

from __future__ import annotations

import zstandard

from fleetlora.common.errors import FleetloraError


class DecompressionError(FleetloraError):
    """Bytes that are not zstd data, or that would inflate past the caller's bound."""


def compress(raw: bytes, *, level: int) -> bytes:
    """``raw`` as one zstd frame at ``level``; the frame declares its content size."""
    return zstandard.ZstdCompressor(level=level).compress(raw)


def decompress(blob: bytes, *, max_bytes: int) -> bytes:
    """The bytes in the zstd frame ``blob``, never more than ``max_bytes`` of them."""
    try:
        # zstd trusts a frame's declared size over max_output_size, so check the declaration first.
        declared = zstandard.frame_content_size(blob)  # -1 when the frame does not declare it
        if declared > max_bytes:
            raise DecompressionError(f"zstd data would inflate to {declared} bytes, more than {max_bytes}")
        return zstandard.ZstdDecompressor().decompress(blob, max_output_size=max_bytes)
    except zstandard.ZstdError as exc:
        raise DecompressionError(f"not zstd data within {max_bytes} bytes ({exc})") from None
