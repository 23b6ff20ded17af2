import pytest
import torch

from fleetlora.common import delta
from fleetlora.common.aggregate import WeightedMean
from fleetlora.common.errors import IncompatibleStateError


def test_weighted_mean_equals_hand_computed_mean_exactly():
    # Prepare: three devices with 1, 2 and 5 examples
    a = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([8.0])}
    b = {"w": torch.tensor([[5.0, 6.0], [7.0, 8.0]]), "b": torch.tensor([0.0])}
    c = {"w": torch.tensor([[-1.0, 0.0], [1.0, 2.0]]), "b": torch.tensor([16.0])}
    mean = WeightedMean(a)

    # Execute
    for state, weight in ((a, 1), (b, 2), (c, 5)):
        mean.add(state, weight=weight)
    result = mean.result()

    # Assert: (1*a + 2*b + 5*c) / 8, worked out by hand
    expected_w = torch.tensor([[(1 + 10 - 5) / 8, (2 + 12 + 0) / 8], [(3 + 14 + 5) / 8, (4 + 16 + 10) / 8]])
    assert torch.equal(result["w"], expected_w)
    assert torch.equal(result["b"], torch.tensor([(8 + 0 + 80) / 8]))
    assert result["w"].dtype == torch.float32
    assert mean.total_weight == 8 and mean.count == 3


def test_weighted_mean_rejects_bad_weight_and_layout():
    mean = WeightedMean({"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="positive"):
        mean.add({"w": torch.ones(2)}, weight=0)
    with pytest.raises(IncompatibleStateError, match="missing"):
        mean.add({"v": torch.ones(2)}, weight=1)
    with pytest.raises(IncompatibleStateError, match=r"\(3,\)"):
        mean.add({"w": torch.ones(3)}, weight=1)
    with pytest.raises(ValueError, match="nothing to average"):
        mean.result()


def test_a_packed_state_folds_to_the_same_bits_as_separate_arrays_and_as_float64_copies():
    # A decoded fp32 upload's arrays are views of one buffer, folded a few pieces at a time (common.delta.
    # packed); others array by array. Both add float32 values into float64 sums without a float64 copy.
    generator = torch.Generator().manual_seed(0)
    states = [
        {"w": torch.randn(300, 256, generator=generator), "b": torch.randn(5, generator=generator)}
        for _ in range(3)
    ]
    weights = (1.0, 7.0, 0.1)
    separate, packed = WeightedMean(states[0]), WeightedMean(states[0])
    by_hand = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in states[0].items()}
    for state, weight in zip(states, weights, strict=True):
        flat = torch.cat([state["b"], state["w"].reshape(-1)])  # name order
        views = {"b": flat[:5], "w": flat[5:].view(300, 256)}
        assert len(delta.packed(views, sorted(views)) or ()) == 3  # 76,805 values
        separate.add(state, weight=weight)
        packed.add(views, weight=weight)
        for name, tensor in state.items():  # what folding did before: a float64 copy, then added
            by_hand[name].add_(tensor.to(torch.float64), alpha=weight)
    for name, total in by_hand.items():
        assert torch.equal(separate.result()[name], packed.result()[name])
        assert torch.equal(separate.result()[name], (total / sum(weights)).to(torch.float32))


def test_a_state_with_a_negated_view_folds_its_values_not_its_memory():
    # The imaginary part of a conjugate reads -buffer[3] at the address of buffer[3], right after "a".
    buffer = torch.arange(1.0, 5.0)
    state = {"a": buffer[:3], "b": torch.view_as_complex(buffer[2:]).conj().imag}
    mean = WeightedMean({"a": torch.zeros(3), "b": torch.zeros(())})
    mean.add(state, weight=1.0)
    assert torch.equal(mean.result()["b"], torch.tensor(-4.0))
    assert torch.equal(mean.result()["a"], buffer[:3])
