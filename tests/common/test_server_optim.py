import pytest
import torch

from fleetlora.common.config import ServerOptimizerSettings
from fleetlora.common.errors import ConfigError
from fleetlora.common.server_optim import register_server_optimizer, server_step

X = {"w": torch.tensor([1.0, -2.0, 0.5])}
D1 = {"w": torch.tensor([0.2, 0.4, -0.1])}
D2 = {"w": torch.tensor([-0.1, 0.3, 0.0])}


def test_fedavg_adds_the_scaled_mean_delta():
    x, state = server_step(ServerOptimizerSettings("fedavg", lr=0.5), X, D1)
    torch.testing.assert_close(x["w"], X["w"] + 0.5 * D1["w"])
    assert state == {}


def test_fedavgm_accumulates_momentum_over_rounds():
    settings = ServerOptimizerSettings("fedavgm", lr=1.0, momentum=0.9)
    x1, s1 = server_step(settings, X, D1)
    x2, _ = server_step(settings, x1, D2, s1)
    # v1 = d1, x1 = x0 + d1 ; v2 = 0.9 d1 + d2, x2 = x1 + v2
    torch.testing.assert_close(x2["w"], X["w"] + D1["w"] + 0.9 * D1["w"] + D2["w"])


def test_fedadam_first_step_by_hand():
    settings = ServerOptimizerSettings("fedadam", lr=0.1, momentum=0.9, beta2=0.99, tau=1e-3)
    x1, state = server_step(settings, X, D1)
    m = 0.1 * D1["w"].double()
    v = 0.01 * D1["w"].double() ** 2
    torch.testing.assert_close(x1["w"], (X["w"].double() + 0.1 * m / (v.sqrt() + 1e-3)).float())
    torch.testing.assert_close(state["v/w"], v.float())


def test_fedyogi_differs_from_fedadam_in_the_second_moment_only():
    adam = ServerOptimizerSettings("fedadam", lr=0.1)
    yogi = ServerOptimizerSettings("fedyogi", lr=0.1)
    (_, a1), (_, y1) = server_step(adam, X, D1), server_step(yogi, X, D1)
    torch.testing.assert_close(a1["v/w"], y1["v/w"])  # from zero moments the first step agrees
    (_, a2), (_, y2) = server_step(adam, X, D2, a1), server_step(yogi, X, D2, y1)
    v1, d2 = y1["v/w"].double(), D2["w"].double() ** 2
    torch.testing.assert_close(y2["v/w"], (v1 - 0.01 * d2 * torch.sign(v1 - d2)).float())
    assert not torch.equal(a2["v/w"], y2["v/w"])


def test_state_of_another_layout_restarts_the_optimizer():
    settings = ServerOptimizerSettings("fedavgm")
    fresh, _ = server_step(settings, X, D1)
    stale, _ = server_step(settings, X, D1, {"m/other": torch.ones(3)})
    assert torch.equal(fresh["w"], stale["w"])


def test_bad_settings_and_duplicate_registration_are_refused():
    with pytest.raises(ConfigError, match="one of"):
        ServerOptimizerSettings("sgd")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="> 0"):
        ServerOptimizerSettings(lr=0)
    with pytest.raises(ValueError, match="already registered"):
        register_server_optimizer("fedadam")(lambda *a: a)
