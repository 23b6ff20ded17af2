import pytest
from opacus.accountants import RDPAccountant

from fleetlora.common.dp_accounting import epsilon_from_history


def test_an_empty_history_has_spent_nothing():
    assert epsilon_from_history([], delta=1e-5) == 0.0


def test_epsilon_is_opacus_rdp_on_the_same_history():
    history = [(1.1, 0.01, 100), (1.3, 0.02, 50)]
    accountant = RDPAccountant()
    accountant.history = list(history)
    assert epsilon_from_history(history, delta=1e-5) == accountant.get_epsilon(1e-5)


def test_steps_split_across_entries_compose_to_the_same_epsilon():
    # RDP composes additively: 3 rounds of 4 steps cost what 12 steps in one go cost.
    split = epsilon_from_history([(1.0, 0.1, 4)] * 3, delta=1e-5)
    assert split == pytest.approx(epsilon_from_history([(1.0, 0.1, 12)], delta=1e-5), rel=1e-12)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_more_steps_cost_more(accountant: str):
    fewer = epsilon_from_history([(1.0, 0.1, 4)], delta=1e-5, accountant=accountant)
    more = epsilon_from_history([(1.0, 0.1, 8)], delta=1e-5, accountant=accountant)
    assert 0 < fewer < more
