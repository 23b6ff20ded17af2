"""Payload codecs for update packages: fp32, fp16 or int8 tensors, optionally top-k sparse, then zstd.

A codec turns an adapter state (or a delta) into bytes and back. Every codec ends in zstd; they
differ in what is compressed:

* ``fp32+zstd`` keeps every bit (lossless);
* ``fp16+zstd`` rounds to half precision;
* ``int8+zstd`` quantizes each tensor symmetrically with one fp32 scale per tensor
  (``scale = max|x| / 127``);
* ``int8+zstd+top<d>`` keeps, per tensor, the share ``d`` of entries largest in magnitude (int8
  values, sorted flat indices stored as gaps, so they compress) and drops the rest to zero.

:data:`LADDER` lists them from the most faithful to the smallest; the package builder takes the
first that fits under the size cap. The container inside zstd is safetensors, so decoding untrusted
bytes never runs pickle, and decompression is bounded (:mod:`fleetlora.common.compression`) so a
small payload cannot expand without limit.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors import deserialize as safetensors_deserialize

from fleetlora.common.compression import DecompressionError, compress, decompress
from fleetlora.common.delta import State, deserialize, serialize
from fleetlora.common.errors import FleetloraError

Precision = Literal["fp32", "fp16", "int8"]
PACKAGE_ZSTD_LEVEL = 19  # packages are built once and fetched by many devices: spend the time compressing
UPLOAD_ZSTD_LEVEL = 3  # an upload is encoded once on a small device: zstd's fast default
INT8_MAX = 127
FP16_MAX = 65504.0
_SCALE, _INDEX, _SHAPE = "@scale", "@index", "@shape"


class CodecError(FleetloraError):
    """Bytes that do not decode with the named codec, or a codec name this version does not know."""


@dataclass(frozen=True)
class Codec:
    """How tensors are stored before zstd: precision, and the share of entries kept (1 = all)."""

    precision: Precision
    density: float = 1.0

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "fp16", "int8"):
            raise CodecError(f"Unknown precision {self.precision!r}: use fp32, fp16 or int8.")
        if not 0 < self.density <= 1:
            raise CodecError(f"Codec density must be in (0, 1], got {self.density}.")
        if self.density < 1 and self.precision != "int8":
            raise CodecError("Top-k sparsification is only offered with int8 values.")

    @property
    def name(self) -> str:
        base = f"{self.precision}+zstd"
        return base if self.density == 1 else f"{base}+top{self.density:g}"

    @property
    def lossless(self) -> bool:
        return self.precision == "fp32" and self.density == 1

    @classmethod
    def parse(cls, name: str) -> Codec:
        """The codec a manifest names, e.g. ``int8+zstd+top0.25``."""
        parts = name.split("+")
        if len(parts) not in (2, 3) or parts[1] != "zstd":
            raise CodecError(f"Unknown codec {name!r}; known: {', '.join(c.name for c in LADDER)}.")
        density = 1.0
        if len(parts) == 3:
            if not parts[2].startswith("top"):
                raise CodecError(f"Unknown codec {name!r}.")
            try:
                density = float(parts[2].removeprefix("top"))
            except ValueError:
                raise CodecError(f"Unknown codec {name!r}.") from None
        return cls(parts[0], density)  # type: ignore[arg-type]  # validated in __post_init__


LADDER: tuple[Codec, ...] = (
    Codec("fp32"),
    Codec("fp16"),
    Codec("int8"),
    *(Codec("int8", d) for d in (0.5, 0.25, 0.1, 0.05, 0.02, 0.01)),
)


def encode(state: Mapping[str, torch.Tensor], codec: Codec, level: int = PACKAGE_ZSTD_LEVEL) -> bytes:
    """The state in ``codec``'s form, as safetensors bytes compressed at zstd ``level``."""
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        tensors.update(_encode_tensor(name, tensor.detach().to(torch.float32).cpu(), codec))
    return compress(serialize(tensors), level=level)


def decode(blob: bytes, codec: Codec, max_bytes: int) -> State:
    """The float32 state ``encode`` stored; refuses to inflate past ``max_bytes``."""
    try:
        raw = decompress(blob, max_bytes=max_bytes)
    except DecompressionError as exc:
        raise CodecError(f"payload refused: {exc}") from None
    # Beside SafetensorError, a hostile header raises KeyError (a dtype safetensors knows and torch does
    # not), TypeError (a dimension past int64 in an array of no values) or RuntimeError: all refusals.
    try:
        if codec.lossless and sys.byteorder == "little":
            return _decode_packed(raw)
        stored = deserialize(raw)
    except SafetensorError as exc:
        raise CodecError(f"payload is not safetensors ({exc})") from None
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise CodecError(f"payload does not hold {codec.name} tensors ({exc})") from None
    try:
        if codec.density < 1:
            _check_dense_size(stored, max_bytes)
        return {name: _decode_tensor(name, stored, codec) for name in stored if "@" not in name}
    except (IndexError, KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise CodecError(f"payload does not hold {codec.name} tensors ({exc})") from None


def inflated_bound(layout: Mapping[str, torch.Tensor]) -> int:
    """An upper bound on a decoded container for ``layout``: a decompression-bomb limit for :func:`decode`.

    fp32 values plus, per tensor, scales, int32 indices and shape, plus the safetensors header.
    """
    return sum(t.numel() for t in layout.values()) * 8 + 4096 * (1 + len(layout))


def relative_error(original: Mapping[str, torch.Tensor], decoded: Mapping[str, torch.Tensor]) -> float:
    """‖original − decoded‖ / ‖original‖ over all tensors (0 for an all-zero original decoded exactly)."""
    error = sum(float((original[n].float() - decoded[n]).pow(2).sum()) for n in original)
    norm = sum(float(original[n].float().pow(2).sum()) for n in original)
    if norm == 0:
        return 0.0 if error == 0 else math.inf
    return math.sqrt(error / norm)


def _encode_tensor(name: str, tensor: torch.Tensor, codec: Codec) -> dict[str, torch.Tensor]:
    if codec.precision == "fp32":
        return {name: tensor.contiguous()}
    if codec.precision == "fp16":
        # Values past fp16's range would come back as inf; leave that to the decoded error check.
        return {name: tensor.to(torch.float16).contiguous()}
    flat = tensor.flatten()
    if codec.density < 1:
        keep = max(1, math.ceil(codec.density * flat.numel()))
        index = flat.abs().topk(keep).indices.sort().values
        values = flat[index]
        gaps = torch.diff(index, prepend=index.new_zeros(1)).to(torch.int32)  # small, repetitive numbers
        scale, quantized = _quantize(values)
        return {
            name: quantized,
            name + _SCALE: scale,
            name + _INDEX: gaps,
            name + _SHAPE: torch.tensor(tensor.shape, dtype=torch.int64),
        }
    scale, quantized = _quantize(flat)
    return {name: quantized.reshape(tensor.shape).contiguous(), name + _SCALE: scale}


def _quantize(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    peak = float(values.abs().max()) if values.numel() else 0.0
    scale = peak / INT8_MAX if peak > 0 else 1.0
    quantized = torch.clamp(torch.round(values / scale), -INT8_MAX, INT8_MAX).to(torch.int8)
    return torch.tensor([scale], dtype=torch.float32), quantized


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _decode_packed(raw: bytes) -> State:
    """An fp32 payload's tensors (side arrays, named with ``@``, left out as by ``_decode_tensor``) as
    views of one writable buffer, in name order, so that the coordinator's norm and fold of the delta
    take a few calls each (:func:`fleetlora.common.delta.packed`) rather than one per tensor.

    safetensors parses and bounds-checks the bytes as for any payload; safetensors' data is little-endian,
    which the caller checks this machine is.
    """
    entries = sorted((name, view) for name, view in safetensors_deserialize(raw) if "@" not in name)
    for name, view in entries:
        if (dtype := _SAFETENSORS_DTYPES.get(view["dtype"], view["dtype"])) != torch.float32:
            raise ValueError(f"{name} is {dtype}, not {torch.float32}")
    buffer = bytearray().join(view["data"] for _, view in entries)
    flat = torch.frombuffer(buffer, dtype=torch.float32) if buffer else torch.empty(0, dtype=torch.float32)
    parts = flat.split([len(view["data"]) // 4 for _, view in entries])
    return {name: part.view(view["shape"]) for (name, view), part in zip(entries, parts, strict=True)}


def _check_dense_size(stored: Mapping[str, torch.Tensor], max_bytes: int) -> None:
    """A top-k payload's ``@shape`` arrays say how large each dense array is: a few bytes that would have
    the decoder allocate and zero any amount of memory. All of them together must fit ``max_bytes``."""
    values = 0
    for name in stored:
        if name.endswith(_SHAPE):
            dims = stored[name].tolist()
            if not isinstance(dims, list) or not all(isinstance(d, int) and d >= 0 for d in dims):
                raise ValueError(f"{name} is not a shape")
            values += math.prod(dims)
    if values * 4 > max_bytes:
        raise ValueError(f"its shapes hold {values} values, more than the {max_bytes // 4} allowed")


def _decode_tensor(name: str, stored: Mapping[str, torch.Tensor], codec: Codec) -> torch.Tensor:
    values = stored[name]
    if codec.precision in ("fp32", "fp16"):
        expected = torch.float32 if codec.precision == "fp32" else torch.float16
        if values.dtype != expected:
            raise ValueError(f"{name} is {values.dtype}, not {expected}")
        return values.to(torch.float32)
    if values.dtype != torch.int8:
        raise ValueError(f"{name} is {values.dtype}, not int8")
    scale = float(stored[name + _SCALE][0])
    if codec.density == 1:
        return values.to(torch.float32) * scale
    shape = torch.Size(stored[name + _SHAPE].tolist())
    index = torch.cumsum(stored[name + _INDEX].to(torch.int64), dim=0)
    dense = torch.zeros(shape.numel(), dtype=torch.float32)
    dense[index] = values.to(torch.float32) * scale
    return dense.reshape(shape)
