"""How fleetlora starts Flower's own processes (SuperLink, SuperNode, the ``flwr`` CLI) on a host.

Flower launches helpers (``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``) by bare name, so
this Python's ``bin`` folder goes first on PATH. Telemetry, update checks and runtime dependency
installation are off: a host never phones home and never installs packages on a run's behalf. Each
host keeps Flower's home (apps, connections) in its own state folder, never in ``~/.flwr``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment for a Flower process whose home is ``flwr_home``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    return {
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
