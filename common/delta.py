"""The adapter as named arrays: extract, load, diff, apply, size, serialize, hash.

An *adapter state* is every trainable parameter of the wrapped model by name (LoRA A/B, the
classification head, any selectively unfrozen layer), as float32 CPU tensors. A *delta* has the
same layout and holds ``after - before``. Serialization is safetensors, never pickle, because
these bytes cross the device/coordinator boundary.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file as safetensors_load_file
from safetensors.torch import save as safetensors_save

from fleetlora.common.errors import IncompatibleStateError

State = dict[str, torch.Tensor]


def trainable_state(model: torch.nn.Module) -> State:
    """A detached copy of every trainable parameter, by name."""
    return {
        name: param.detach().to("cpu", copy=True)
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def load_trainable_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's trainable parameters; the layout must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    check_layout(state, {n: p.detach() for n, p in params.items()})
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name])


def check_layout(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`IncompatibleStateError` unless names, shapes and dtypes all match."""
    missing, extra = reference.keys() - state.keys(), state.keys() - reference.keys()
    if missing or extra:
        raise IncompatibleStateError(
            f"Adapter layout differs: {len(missing)} arrays missing (e.g. {sorted(missing)[:2]}), "
            f"{len(extra)} unexpected (e.g. {sorted(extra)[:2]})."
        )
    for name, ref in reference.items():
        got = state[name]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise IncompatibleStateError(
                f"Array {name!r} is {tuple(got.shape)} {got.dtype}, expected {tuple(ref.shape)} {ref.dtype}."
            )


def diff(after: Mapping[str, torch.Tensor], before: Mapping[str, torch.Tensor]) -> State:
    """``after - before``, array by array."""
    check_layout(after, before)
    return {name: after[name] - before[name] for name in before}


def apply_delta(state: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> State:
    """``state + delta``, array by array."""
    check_layout(delta, state)
    return {name: state[name] + delta[name] for name in state}


def is_finite(state: Mapping[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state.values())


def l2_norm(state: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of all arrays together, reduced in float64 (no float64 copy of the values is made).

    Arrays packed into one buffer (:func:`packed`, as a decoded fp32 upload is) take a few reductions
    rather than one per array: per-call overhead was most of this on the coordinator's path. A NaN or
    inf value makes the result NaN or inf, squares being never negative; for float32 values the
    converse holds too, since a float64 sum of their squares (each below 1.2e77) cannot overflow.
    """
    pieces = packed(state, state)
    tensors = pieces if pieces is not None and pieces[0].is_floating_point() else state.values()
    return math.hypot(*(_norm64(t) for t in tensors))


def _norm64(tensor: torch.Tensor) -> float:
    floating = tensor if tensor.is_floating_point() else tensor.double()  # vector_norm refuses integers
    return float(torch.linalg.vector_norm(floating, dtype=torch.float64))


PIECE_VALUES = 32_768
"""The most values in one of :func:`packed`'s pieces: torch's grain size, below which an op runs on the
calling thread. Above it, torch splits the op across its threads, and on a busy coordinator waiting for
them took milliseconds where the op takes tens of microseconds (the adapter's own arrays are smaller)."""


def packed(state: Mapping[str, torch.Tensor], names: Iterable[str]) -> list[torch.Tensor] | None:
    """The arrays ``names`` of ``state`` as flat pieces of :data:`PIECE_VALUES` values (the last one
    shorter), if they lie back to back in that order, all contiguous, of one dtype and read as stored (no
    negative or conjugate view), as :func:`fleetlora.common.codec.decode` gives an fp32 delta; else None.

    The pieces read the very memory the arrays occupy, so a call on each does what a call per array
    would, with fewer calls (and writing to them writes to the arrays). Checked on every call: nothing
    is trusted to stay packed. Two states packed in the same order and layout give matching pieces.
    """
    tensors = [t for t in (state[name] for name in names) if t.numel()]  # an empty one may point anywhere
    if not tensors:
        return None
    first = tensors[0]
    dtype, size = first.dtype, first.element_size()
    end = first.data_ptr()
    for tensor in tensors:
        if tensor.dtype != dtype or tensor.data_ptr() != end or not tensor.is_contiguous():
            return None
        if tensor.is_neg() or tensor.is_conj():  # a view that reads its memory negated or conjugated
            return None
        end += tensor.numel() * size
    count = (end - first.data_ptr()) // size
    if (first.storage_offset() + count) * size > first.untyped_storage().nbytes():
        return None  # back to back in memory, but not all in the first array's buffer
    return list(first.as_strided((count,), (1,), first.storage_offset()).split(PIECE_VALUES))


def nbytes(state: Mapping[str, torch.Tensor]) -> int:
    """Exact payload size in bytes (elements × element size), excluding names and framing."""
    return sum(t.numel() * t.element_size() for t in state.values())


def to_array_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """The tensors as a Flower ArrayRecord, one array per tensor (opaque bytes go by :mod:`.chunks`)."""
    return ArrayRecord({name: t.contiguous() for name, t in state.items()})


def from_array_record(record: ArrayRecord) -> State:
    """The tensors :func:`to_array_record` stored."""
    return dict(record.to_torch_state_dict())


def serialize(state: Mapping[str, torch.Tensor]) -> bytes:
    """Canonical safetensors bytes (keys sorted by the format), so equal states hash equal."""
    return safetensors_save({name: t.contiguous() for name, t in state.items()})


def deserialize(blob: bytes) -> State:
    return dict(safetensors_load(blob))


def deserialize_file(path: Path) -> State:
    """The tensors of a safetensors file, as views of a private (copy-on-write) memory map of it.

    Nothing is read up front: pages come in as the tensors are used, with no whole-file bytes object
    between. Writing to a tensor never changes the file, and a file replaced by rename (how a device's
    state folder writes every file) leaves loaded tensors as they were; a file rewritten in place would
    show through, and one truncated in place would crash the process that reads them.
    """
    return dict(safetensors_load_file(path))


def sha256_hex(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def layout_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """A hash of names, shapes and dtypes: two states with equal fingerprints can be averaged."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(f"{name}:{tuple(state[name].shape)}:{state[name].dtype};".encode())
    return digest.hexdigest()
