import pytest
import torch

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
