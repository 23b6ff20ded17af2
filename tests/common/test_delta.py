import math

import pytest
import torch

from fleetlora.common import delta
from fleetlora.common.errors import IncompatibleStateError


def _state() -> delta.State:
    return {"lora_A": torch.randn(8, 32), "lora_B": torch.zeros(32, 8), "head": torch.randn(10, 32)}


def test_diff_then_apply_restores_after():
    before = _state()
    after = {n: t + torch.randn_like(t) for n, t in before.items()}
    d = delta.diff(after, before)
    restored = delta.apply_delta(before, d)
    for name in before:
        torch.testing.assert_close(restored[name], after[name])


def test_nbytes_is_exact_payload_size():
    state = {"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.float16)}
    assert delta.nbytes(state) == 3 * 4 * 4 + 5 * 2


def test_serialize_round_trip_and_hash_is_canonical():
    state = _state()
    blob = delta.serialize(state)
    back = delta.deserialize(blob)
    assert set(back) == set(state)
    assert all(torch.equal(back[n], state[n]) for n in state)
    reordered = dict(reversed(list(state.items())))
    assert delta.sha256_hex(delta.serialize(reordered)) == delta.sha256_hex(blob)


def test_array_record_round_trip():
    state = _state()
    back = delta.from_array_record(delta.to_array_record(state))
    assert all(torch.equal(back[n], state[n]) for n in state)


def test_layout_mismatch_is_refused_with_names():
    with pytest.raises(IncompatibleStateError, match="lora_A"):
        delta.diff({"lora_A": torch.zeros(8, 31)}, {"lora_A": torch.zeros(8, 32)})
    with pytest.raises(IncompatibleStateError, match="missing"):
        delta.apply_delta(_state(), {"lora_A": torch.zeros(8, 32)})


def test_non_finite_values_are_detected():
    assert delta.is_finite(_state())
    assert not delta.is_finite({"x": torch.tensor([1.0, float("nan")])})
    assert not delta.is_finite({"x": torch.tensor([float("inf")])})


def _packed(state: delta.State) -> delta.State:
    """``state``'s arrays as views of one flat buffer, in name order (as an fp32 upload decodes)."""
    names = sorted(state)
    flat = torch.cat([state[n].reshape(-1) for n in names])
    parts = flat.split([state[n].numel() for n in names])
    return {n: part.view(state[n].shape) for n, part in zip(names, parts, strict=True)}


def test_packed_finds_back_to_back_arrays_and_nothing_else():
    state = _packed({**_state(), "big": torch.randn(300, 256)})
    pieces = delta.packed(state, sorted(state))
    assert pieces is not None
    assert [p.numel() for p in pieces] == [delta.PIECE_VALUES] * 2 + [300 * 256 + 8 * 32 * 2 + 320 - 65_536]
    assert torch.equal(torch.cat(pieces), torch.cat([state[n].reshape(-1) for n in sorted(state)]))
    assert delta.packed(state, reversed(sorted(state))) is None  # another order
    assert delta.packed(_state(), sorted(_state())) is None  # arrays of their own
    assert delta.packed({**state, "head": state["head"].t()}, sorted(state)) is None  # not contiguous
    assert delta.packed({**state, "head": state["head"].double()}, sorted(state)) is None  # two dtypes
    view = state["lora_A"]
    assert delta.packed({"a": view, "b": view}, ["a", "b"]) is None  # the same memory twice
    assert delta.packed({}, []) is None


@pytest.mark.parametrize("layout", [dict, _packed], ids=["arrays", "packed"])
def test_l2_norm_is_the_float64_norm_whatever_the_layout(layout):
    state = layout({n: t.to(torch.float32) * 1e-3 for n, t in _state().items()})
    exact = sum(float(t.double().pow(2).sum()) for t in state.values()) ** 0.5
    assert delta.l2_norm(state) == pytest.approx(exact, rel=1e-12)
    assert delta.l2_norm(layout({"big": torch.full((1000,), 3.4e38)})) == pytest.approx(3.4e38 * 1000**0.5)
    assert delta.l2_norm({"steps": torch.arange(4)}) == pytest.approx(14**0.5)  # integers too
    assert delta.l2_norm({}) == 0.0


@pytest.mark.parametrize("layout", [dict, _packed], ids=["arrays", "packed"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_single_nan_or_inf_value_makes_the_l2_norm_non_finite(layout, bad: float):
    # The coordinator reads finiteness off the norm (coordinator/aggregation.py): every position counts,
    # in arrays large enough for torch's vectorized reductions.
    for position in (0, 4_321, 99_999):
        state = {"a": torch.randn(100_000) * 1e-3, "b": torch.randn(7)}
        state["a"][position] = bad
        assert not math.isfinite(delta.l2_norm(layout(state)))


def _with_a_negated_view() -> delta.State:
    """Two arrays back to back in one buffer, the second read through a negative view: public torch
    (the imaginary part of a conjugate) reads ``-buffer[3]`` at the address of ``buffer[3]``."""
    buffer = torch.arange(1.0, 5.0)
    negated = torch.view_as_complex(buffer[2:]).conj().imag
    assert negated.is_neg() and negated.data_ptr() == buffer[3:].data_ptr() and float(negated) == -4.0
    return {"a": buffer[:3], "b": negated}


def test_packed_refuses_arrays_whose_memory_is_not_their_values():
    # A negative (or conjugate) view reads its memory negated: a piece of plain memory would not.
    state = _with_a_negated_view()
    assert delta.packed(state, ["a", "b"]) is None
    assert delta.l2_norm(state) == pytest.approx(30**0.5)


def test_packed_reads_within_the_first_array_s_storage_only():
    # Back to back in memory, but two storages (two views of one bytearray): the flat view of the first
    # would read past its storage's end, so packed declines; a view's offset within one storage is kept.
    memory = bytearray(torch.arange(8.0).numpy().tobytes())
    first = torch.frombuffer(memory, dtype=torch.float32, count=4)
    second = torch.frombuffer(memory, dtype=torch.float32, count=4, offset=16)
    assert second.data_ptr() == first.data_ptr() + 16 and first.untyped_storage().nbytes() == 16
    assert delta.packed({"a": first, "b": second}, ["a", "b"]) is None
    whole = torch.arange(6.0)
    pieces = delta.packed({"a": whole[1:3], "b": whole[3:]}, ["a", "b"])
    assert pieces is not None and len(pieces) == 1 and torch.equal(pieces[0], whole[1:])
