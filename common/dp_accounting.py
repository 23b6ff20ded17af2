"""ε from an accountant's history: the one computation both kinds of DP in fleetlora report.

A history is Opacus' form: one ``(noise_multiplier, sample_rate, steps)`` entry per run of steps at
one setting. RDP and PRV compose exactly from it, so ε depends only on the history, never on the
process that spent it: a device sums its DP-SGD rounds across restarts (``client/privacy.py``), the
coordinator its central-DP rounds (one step each at q = sampled / online devices). Pure: no I/O,
no state kept between calls.
"""

from __future__ import annotations

from collections.abc import Sequence

from opacus.accountants import create_accountant

AccountantStep = tuple[float, float, int]  # (noise multiplier σ, sample rate q, steps)


def epsilon_from_history(
    history: Sequence[AccountantStep], *, delta: float, accountant: str = "rdp"
) -> float:
    """ε at ``delta`` after every step in ``history``, composed by Opacus' ``accountant`` ("rdp", "prv").

    An empty history has spent nothing: 0.
    """
    if not history:
        return 0.0
    composer = create_accountant(accountant)
    composer.history = list(history)
    return float(composer.get_epsilon(delta))
