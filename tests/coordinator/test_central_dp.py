"""User-level DP at the coordinator: clipping, the noised fixed-denominator mean, durable accounting."""

from __future__ import annotations

import pytest
import torch

from fleetlora.client.client_app import build_client_app
from fleetlora.common.delta import l2_norm
from fleetlora.common.dp_accounting import epsilon_from_history
from fleetlora.common.errors import ConfigError
from fleetlora.coordinator.central_dp import (
    CENTRAL_DP_EPSILON,
    CentralDPSettings,
    clip,
    privatize,
)
from fleetlora.coordinator.rounds import Federation
from fleetlora.coordinator.settings import CoordinatorSettings
from tests.coordinator.local_grid import LocalGrid
from tests.coordinator.test_rounds import _run_config


def test_clipping_bounds_the_norm_and_keeps_the_direction():
    delta = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}  # norm 5
    clipped, was = clip(delta, 1.0)
    assert was and l2_norm(clipped) == pytest.approx(1.0)
    assert torch.allclose(clipped["a"], torch.tensor([0.6, 0.0]))
    small, was = clip(delta, 10.0)
    assert not was and torch.equal(small["a"], delta["a"])


def test_the_noised_mean_has_a_fixed_denominator_and_the_calibrated_noise():
    mean = {"w": torch.full((200_000,), 0.5)}
    quiet = privatize(
        mean, contributors=3, sampled=4, dp=CentralDPSettings(noise_multiplier=1e-12, clip_norm=1.0)
    )
    assert torch.allclose(quiet["w"], torch.full((200_000,), 0.375))  # 3 × 0.5 / 4 sampled
    noisy = privatize(
        mean, contributors=3, sampled=4, dp=CentralDPSettings(noise_multiplier=2.0, clip_norm=0.5)
    )
    assert float((noisy["w"] - 0.375).std()) == pytest.approx(2.0 * 0.5 / 4, rel=0.02)


def test_bad_central_dp_settings_are_refused():
    with pytest.raises(ConfigError, match="central-dp-noise"):
        CentralDPSettings(noise_multiplier=-1)
    with pytest.raises(ConfigError, match="central-dp-clip"):
        CentralDPSettings(clip_norm=0)


def _central_run(url: str, rounds: int) -> list:
    config = _run_config(url, **{"central-dp-noise": 1.0, "central-dp-clip": 0.001, "rounds": rounds})
    grid = LocalGrid(build_client_app(), 3, config)
    return Federation(grid, CoordinatorSettings.from_run_config(config)).run()


def test_central_epsilon_composes_over_rounds_and_survives_a_restart(tmp_path):
    continuous = _central_run(f"sqlite:///{tmp_path / 'a.db'}", 2)
    first = _central_run(f"sqlite:///{tmp_path / 'b.db'}", 1)
    (resumed,) = _central_run(f"sqlite:///{tmp_path / 'b.db'}", 1)

    one, two = (o.metrics[CENTRAL_DP_EPSILON] for o in continuous)
    assert 0 < one < two
    assert two == pytest.approx(
        epsilon_from_history([(1.0, 1.0, 1), (1.0, 1.0, 1)], delta=1e-5)
    )  # 3 of 3 sampled: q = 1
    assert first[0].metrics[CENTRAL_DP_EPSILON] == pytest.approx(one)
    assert resumed.metrics[CENTRAL_DP_EPSILON] == pytest.approx(two)  # history rebuilt from SQL
    assert all(o.metrics["central_dp_clipped"] == 3 for o in continuous)  # a 0.001 bound clips every delta
