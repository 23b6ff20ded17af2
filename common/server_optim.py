"""Server optimizers: the next global adapter from the current one and the devices' mean delta.

Pure functions with no I/O: ``(state, mean_delta, optimizer_state) -> (new_state, new_optimizer_state)``.
The optimizer state is a flat dict of named tensors (``m/<array>``, ``v/<array>``) so the
coordinator can store it beside each version and a restart continues the same optimizer.
Computed in float64 and cast back, so the update is rounded once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from fleetlora.common.config import ServerOptimizerSettings
from fleetlora.common.delta import State, check_layout

ServerStep = Callable[[ServerOptimizerSettings, State, State, State], tuple[State, State]]
_STEPS: dict[str, ServerStep] = {}


def register_server_optimizer(name: str) -> Callable[[ServerStep], ServerStep]:
    """Register a server step under ``name``; a name can be registered once."""

    def register(step: ServerStep) -> ServerStep:
        if name in _STEPS:
            raise ValueError(f"Server optimizer {name!r} is already registered.")
        _STEPS[name] = step
        return step

    return register


def server_step(
    settings: ServerOptimizerSettings,
    state: Mapping[str, torch.Tensor],
    mean_delta: Mapping[str, torch.Tensor],
    optimizer_state: Mapping[str, torch.Tensor] | None = None,
) -> tuple[State, State]:
    """Apply one server step; a missing or mismatched optimizer state starts fresh (zeros)."""
    check_layout(mean_delta, state)
    previous = dict(optimizer_state or {})
    if any(k.split("/", 1)[1] not in state for k in previous):
        previous = {}
    wide = {n: t.to(torch.float64) for n, t in state.items()}
    delta = {n: t.to(torch.float64) for n, t in mean_delta.items()}
    moments = {k: t.to(torch.float64) for k, t in previous.items()}
    new_wide, new_moments = _STEPS[settings.name](settings, wide, delta, moments)
    return (
        {n: new_wide[n].to(state[n].dtype) for n in state},
        {k: t.to(torch.float32) for k, t in new_moments.items()},
    )


def _moment(moments: State, key: str, like: torch.Tensor) -> torch.Tensor:
    return moments.get(key, torch.zeros_like(like))


@register_server_optimizer("fedavg")
def _fedavg(s: ServerOptimizerSettings, x: State, d: State, _: State) -> tuple[State, State]:
    return {n: x[n] + s.lr * d[n] for n in x}, {}


@register_server_optimizer("fedavgm")
def _fedavgm(s: ServerOptimizerSettings, x: State, d: State, moments: State) -> tuple[State, State]:
    # v <- beta * v + delta ; x <- x + lr * v   (Hsu et al. 2019, Algorithm 1 with the delta as -grad)
    v = {n: s.momentum * _moment(moments, f"m/{n}", d[n]) + d[n] for n in x}
    return {n: x[n] + s.lr * v[n] for n in x}, {f"m/{n}": v[n] for n in x}


def _adaptive(second_moment: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]) -> ServerStep:
    """FedAdam/FedYogi (Reddi et al. 2021, Algorithm 2): they differ only in the second moment."""

    def step(s: ServerOptimizerSettings, x: State, d: State, moments: State) -> tuple[State, State]:
        new_x, new_moments = {}, {}
        for n in x:
            m = s.momentum * _moment(moments, f"m/{n}", d[n]) + (1 - s.momentum) * d[n]
            v = second_moment(_moment(moments, f"v/{n}", d[n]), d[n] * d[n], s.beta2)
            new_x[n] = x[n] + s.lr * m / (v.sqrt() + s.tau)
            new_moments[f"m/{n}"], new_moments[f"v/{n}"] = m, v
        return new_x, new_moments

    return step


register_server_optimizer("fedadam")(_adaptive(lambda v, d2, b2: b2 * v + (1 - b2) * d2))
register_server_optimizer("fedyogi")(_adaptive(lambda v, d2, b2: v - (1 - b2) * d2 * torch.sign(v - d2)))
