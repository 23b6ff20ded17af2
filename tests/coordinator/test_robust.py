"""Coordinate-wise trimmed mean and median (coordinator/robust.py): what an attacker inside the trim can
and cannot do, and how the choice is configured."""

from __future__ import annotations

import pytest
import torch

from fleetlora.common.delta import State
from fleetlora.common.errors import ConfigError
from fleetlora.coordinator.influence import InfluenceSettings
from fleetlora.coordinator.robust import AGGREGATOR_TRIMMED, CoordinateTrimmedMean, values_trimmed
from fleetlora.coordinator.settings import CoordinatorSettings

REFERENCE: State = {"w": torch.zeros(3), "b": torch.zeros(1, dtype=torch.float64)}


def _delta(*w: float, b: float = 0.0) -> State:
    return {"w": torch.tensor(w), "b": torch.tensor([b], dtype=torch.float64)}


def _release(trim: float, deltas: list[State], examples: list[float] | None = None):
    mean = CoordinateTrimmedMean(REFERENCE, trim)
    for delta, count in zip(deltas, examples or [1.0] * len(deltas), strict=True):
        mean.add(delta, examples=count)
    return mean.release(sampled=len(deltas), online=len(deltas))


@pytest.mark.parametrize(
    ("count", "trim", "cut"), [(5, 0.2, 1), (4, 0.2, 0), (10, 0.25, 2), (4, 0.5, 1), (5, 0.5, 2)]
)
def test_values_trimmed_leaves_at_least_the_middle(count: int, trim: float, cut: int):
    assert values_trimmed(count, trim) == cut


def test_the_trimmed_mean_cuts_each_coordinate_separately_and_ignores_claimed_counts():
    honest = [_delta(1.0, -1.0, 2.0, b=0.5), _delta(2.0, 0.0, 2.0, b=0.5), _delta(3.0, 1.0, 2.0, b=0.5)]
    attacker = _delta(1e6, -1e6, 2.0, b=-1e6)  # within the trim: 1 of 5 is cut from each end
    update = _release(0.2, [*honest, attacker, _delta(2.0, 0.0, 2.0, b=0.5)], examples=[1, 1, 1, 10**9, 1])

    assert torch.allclose(update.delta["w"], torch.tensor([7 / 3, -1 / 3, 2.0]))  # the attacker never counts
    assert update.delta["b"].dtype == torch.float64 and update.delta["b"].item() == 0.5
    assert update.metrics == {AGGREGATOR_TRIMMED: 1.0}


def test_the_median_holds_against_two_colluding_attackers_in_five():
    honest = [_delta(1.0, 1.0, 1.0), _delta(2.0, 2.0, 2.0), _delta(3.0, 3.0, 3.0)]
    colluding = [_delta(-50.0, 50.0, 50.0)] * 2  # identical, as colluders send

    update = _release(0.5, [*honest, *colluding])

    # Every coordinate stays inside the range the honest devices span.
    assert torch.all(update.delta["w"] >= 1.0) and torch.all(update.delta["w"] <= 3.0)


def test_the_median_of_an_even_count_averages_the_two_middle_values():
    update = _release(
        0.5, [_delta(1.0, 0.0, 0.0), _delta(2.0, 0.0, 0.0), _delta(4.0, 0.0, 0.0), _delta(9.0, 0.0, 0.0)]
    )
    assert update.delta["w"][0].item() == 3.0


def test_nothing_to_release_is_an_error():
    with pytest.raises(ValueError, match="nothing to aggregate"):
        CoordinateTrimmedMean(REFERENCE, 0.2).release(sampled=1, online=1)


@pytest.mark.parametrize(("aggregator", "trim"), [("mean", None), ("trimmed-mean", 0.2), ("median", 0.5)])
def test_the_aggregator_setting_names_the_trim(aggregator: str, trim: float | None):
    assert InfluenceSettings(aggregator=aggregator).trim == trim


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"aggregator": "krum"}, "aggregator: must be one of auto, mean, trimmed-mean, median"),
        ({"aggregator-trim": 0.5}, "aggregator-trim"),
        ({"aggregator": "median", "central-dp-noise": 1.0}, "cannot be combined with central DP"),
    ],
)
def test_a_bad_aggregator_setting_is_refused_with_what_to_do(settings: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        CoordinatorSettings.from_run_config({"model": "tiny", **settings})
