"""How fleetlora starts Flower's own processes (SuperLink, SuperNode, the ``flwr`` CLI) on a host.

Flower launches helpers (``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``) by bare name, so
this Python's ``bin`` folder goes first on PATH. Telemetry, update checks and runtime dependency
installation are off: a host never phones home and never installs packages on a run's behalf. Each
host keeps Flower's home (apps, connections) in its own state folder, never in ``~/.flwr``.

``flower-superexec``, which starts a run's ServerApp on the coordinator host and, without the warm
runner, each message's ClientApp on a device, asks for work every second by default: every run start
and every such message waited half a second for it on average. It asks every 0.1 s here, as the warm
runner does (an environment that sets ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` keeps its own).
:func:`retry_pulls_sooner` shortens another of Flower's waits, inside the processes that pull messages.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from types import ModuleType

TASK_POLL_INTERVAL = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # read by flower-superexec (flwr 1.41)
SUPEREXEC_POLL_SECONDS = "0.1"
PULL_FIRST_BACKOFF_SECONDS = 0.05


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment for a Flower process whose home is ``flwr_home``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    return {
        TASK_POLL_INTERVAL: SUPEREXEC_POLL_SECONDS,
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(flwr_home.resolve()),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }


def flower_command(name: str) -> str:
    """The path of a Flower console script installed beside this Python."""
    return str(Path(sys.executable).parent / name)


def retry_pulls_sooner(module: ModuleType, function: str) -> None:
    """Make Flower's ``module.function``, which pulls a message's objects, ask again for a missing one
    after :data:`PULL_FIRST_BACKOFF_SECONDS` instead of 1 s (``PULL_INITIAL_BACKOFF``; then doubling,
    within Flower's limits, as before).

    Flower hands out a message before its objects are all stored: the SuperNode makes a ClientApp's
    task before it has pulled the message's objects from the SuperLink, and the SuperLink gives the
    ServerApp a reply whose objects the SuperNode is still pushing. Whoever takes it quickly finds an
    object missing and waited a second, or three, for what arrives milliseconds later. Idempotent.
    """
    pull = getattr(module, function)
    if not isinstance(pull, functools.partial):
        setattr(module, function, functools.partial(pull, initial_backoff=PULL_FIRST_BACKOFF_SECONDS))
