"""common/flower_env.py: how Flower's processes are started, and the sooner retries of their pulls."""

from __future__ import annotations

import functools
import types
from pathlib import Path

import pytest

from fleetlora.common.flower_env import (
    PULL_FIRST_BACKOFF_SECONDS,
    TASK_POLL_INTERVAL,
    flower_env,
    retry_pulls_sooner,
)


def test_superexec_asks_for_work_every_tenth_of_a_second_unless_the_environment_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv(TASK_POLL_INTERVAL, raising=False)
    assert flower_env(tmp_path)[TASK_POLL_INTERVAL] == "0.1"
    monkeypatch.setenv(TASK_POLL_INTERVAL, "2")
    assert flower_env(tmp_path)[TASK_POLL_INTERVAL] == "2"


def test_a_pull_retries_a_missing_object_sooner_once_however_often_it_is_asked():
    def pull(object_ids: list[str], *, initial_backoff: float = 1.0) -> float:
        return initial_backoff

    module = types.ModuleType("flower_module")
    module.pull = pull  # type: ignore[attr-defined]
    retry_pulls_sooner(module, "pull")
    retry_pulls_sooner(module, "pull")
    assert module.pull(["a"]) == PULL_FIRST_BACKOFF_SECONDS == 0.05
    assert module.pull.func is pull and not isinstance(module.pull.func, functools.partial)
    assert module.pull(["a"], initial_backoff=2.0) == 2.0  # a caller's own choice still wins
