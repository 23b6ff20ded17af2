"""Run the coordinator host's SuperLink: TLS on, SuperNode authentication on, state in a database.

``fleetlora coordinator up`` makes what is missing (coordinator keys, TLS certificates, the schema of
fleetlora's database), writes the operator CLI's connection into Flower's home, and then runs
``flower-superlink`` in the foreground until it exits or is signalled. Devices, operators and the
ServerApp of each run all reach it on one HTTPS port.
"""

from __future__ import annotations

import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType

from fleetlora.common.errors import ConfigError, FleetloraError
from fleetlora.common.flower_env import flower_command, flower_env
from fleetlora.common.host_config import CoordinatorHost
from fleetlora.common.keys import COORDINATOR_HPKE_KEY
from fleetlora.coordinator.certs import CA_CERT, SERVER_CERT, SERVER_KEY, init_certs
from fleetlora.coordinator.db import Database, upgrade
from fleetlora.coordinator.keys import init_keys

CONNECTION = "fleet"  # the operator CLI's name for this SuperLink in Flower's config.toml
READY_TIMEOUT = 60.0


def prepare(host: CoordinatorHost) -> list[str]:
    """Create what the SuperLink needs and is not there yet; return what was made, for the log."""
    made = []
    if not (host.keys_dir / COORDINATOR_HPKE_KEY).exists():
        made += [str(p) for p in init_keys(host.keys_dir)]
    if not (host.certs_dir / CA_CERT).exists():
        # The SuperLink's own helpers dial it on loopback: those names are always in the certificate.
        names = tuple(dict.fromkeys((*host.tls_hosts, "localhost", "127.0.0.1")))
        made += [str(p) for p in init_certs(host.certs_dir, names)]
    upgrade(Database(host.database_url).engine)
    write_connection(host)
    return made


def write_connection(host: CoordinatorHost) -> Path:
    """Flower's ``config.toml`` for the operator CLI: one connection, with this host's CA.

    Written before any ``flwr`` command runs: without it the CLI would make its own default, which
    starts a local simulation SuperLink of its own.
    """
    path = host.flwr_home / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{host.address}"\nroot-certificates = "{(host.certs_dir / CA_CERT).resolve()}"\n'
    )
    return path


def superlink_command(host: CoordinatorHost) -> list[str]:
    return [
        flower_command("flower-superlink"),
        "--host", host.host,
        "--port", str(host.port),
        "--ssl-ca-certfile", str(host.certs_dir / CA_CERT),
        "--ssl-certfile", str(host.certs_dir / SERVER_CERT),
        "--ssl-keyfile", str(host.certs_dir / SERVER_KEY),
        "--enable-supernode-auth",
        "--database", str(host.superlink_db.resolve()),
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip


def start(host: CoordinatorHost, log: Path | None = None) -> subprocess.Popen[bytes]:
    """Start the SuperLink and return once it answers on its port (or raise with its log)."""
    if not (host.certs_dir / SERVER_CERT).exists():
        raise ConfigError(f"No TLS certificate in {host.certs_dir}: run `fleetlora coordinator up` once.")
    output = log.open("ab") if log else None
    process = subprocess.Popen(
        superlink_command(host),
        env=flower_env(host.flwr_home),
        cwd=host.state_dir,
        stdout=output,
        stderr=subprocess.STDOUT if output else None,
    )
    wait_ready(host, process)
    return process


def wait_ready(
    host: CoordinatorHost, process: subprocess.Popen[bytes], timeout: float = READY_TIMEOUT
) -> float:
    """Seconds until the SuperLink's health endpoint answers over TLS; raise if it exits or times out."""

    context = ssl.create_default_context(cafile=str(host.certs_dir / CA_CERT))
    url = f"https://{host.address}/health"
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise FleetloraError(f"flower-superlink exited with code {process.returncode} while starting.")
        try:
            with urllib.request.urlopen(url, context=context, timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    process.terminate()
    raise FleetloraError(f"flower-superlink did not answer on {url} within {timeout:.0f} s.")


def run_foreground(host: CoordinatorHost) -> int:
    """Start the SuperLink and wait for it; SIGINT/SIGTERM stop it cleanly."""
    process = start(host)

    def stop(signum: int, _frame: FrameType | None) -> None:
        process.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return process.wait()
