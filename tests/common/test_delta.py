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
