"""Run the coordinator host's SuperLink: TLS on, SuperNode authentication on, state in a database.

``fleetlora coordinator up`` makes what is missing (coordinator keys, TLS certificates, the schema of
fleetlora's database), writes the operator CLI's connection into Flower's home, and then runs
``flower-superlink`` in the foreground until it exits or is signalled. Devices, operators and the
ServerApp of each run all reach it on one HTTPS port. That port speaks TLS 1.3 only: Flower's SuperLink
cannot refuse TLS 1.2, so it listens on loopback and a terminator in this process holds the public port
(:mod:`fleetlora.coordinator.tls_terminator`; ``tls-terminator = false`` in ``[coordinator]`` turns it off).
"""

from __future__ import annotations

import logging
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from fleetlora.common.errors import ConfigError, FleetloraError
from fleetlora.common.flower_env import flower_command, flower_env
from fleetlora.common.host_config import CoordinatorHost
from fleetlora.common.keys import COORDINATOR_HPKE_KEY
from fleetlora.coordinator.certs import CA_CERT, SERVER_CERT, SERVER_KEY, init_certs
from fleetlora.coordinator.db import Database, upgrade
from fleetlora.coordinator.keys import init_keys
from fleetlora.coordinator.tls_terminator import (
    Limits,
    TerminatorThread,
    TlsTerminator,
    backend_context,
    server_context,
)

CONNECTION = "fleet"  # the operator CLI's name for this SuperLink in Flower's config.toml
READY_TIMEOUT = 60.0
log = logging.getLogger(__name__)


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
    bind_host, bind_port = host.superlink_bind
    return [
        flower_command("flower-superlink"),
        "--host", bind_host,
        "--port", str(bind_port),
        "--ssl-ca-certfile", str(host.certs_dir / CA_CERT),
        "--ssl-certfile", str(host.certs_dir / SERVER_CERT),
        "--ssl-keyfile", str(host.certs_dir / SERVER_KEY),
        "--enable-supernode-auth",
        "--database", str(host.superlink_db.resolve()),
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip


@dataclass
class Running:
    """A started SuperLink and the terminator in front of it (None when ``tls-terminator`` is off)."""

    process: subprocess.Popen[bytes]
    terminator: TerminatorThread | None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM the SuperLink, wait for it, then close the terminator; the SuperLink's exit code."""
        self.process.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
        finally:
            if self.terminator is not None:
                self.terminator.stop()


def start_terminator(host: CoordinatorHost) -> TerminatorThread:
    """Bind the public port (TLS 1.3 only) and relay to the SuperLink's loopback port."""
    certs = host.certs_dir
    terminator = TlsTerminator(
        (host.host, host.port),
        host.superlink_bind,
        server_context(certs / SERVER_CERT, certs / SERVER_KEY),
        backend_context(certs / CA_CERT),  # `prepare` always puts 127.0.0.1 in the certificate
        limits=Limits.within_open_files(),
    )
    return TerminatorThread(terminator).start()


def start(host: CoordinatorHost, log_file: Path | None = None) -> Running:
    """Start the terminator and the SuperLink; return once /health answers on the public port (or raise)."""
    if not (host.certs_dir / SERVER_CERT).exists():
        raise ConfigError(f"No TLS certificate in {host.certs_dir}: run `fleetlora coordinator up` once.")
    internal = host.superlink_bind[1]
    if host.tls_terminator and not (0 < internal < 65536 and internal != host.port):
        raise ConfigError(f"internal-port {internal}: give a free port other than port {host.port}.")
    # The public port first: if it is taken, nothing is started.
    terminator = start_terminator(host) if host.tls_terminator else None
    output = log_file.open("ab") if log_file else None
    process: subprocess.Popen[bytes] | None = None
    try:
        process = subprocess.Popen(
            superlink_command(host),
            env=flower_env(host.flwr_home),
            cwd=host.state_dir,
            stdout=output,
            stderr=subprocess.STDOUT if output else None,
        )
        wait_ready(host, process)
    except BaseException:
        if process is not None and process.poll() is None:
            process.terminate()
            process.wait(30)
        if terminator is not None:
            terminator.stop()
        raise
    return Running(process, terminator)


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
        except (urllib.error.URLError, ConnectionError, TimeoutError, ssl.SSLError):
            time.sleep(0.2)  # through the terminator, a SuperLink not up yet closes the session
    process.terminate()
    raise FleetloraError(f"flower-superlink did not answer on {url} within {timeout:.0f} s.")


def run_foreground(host: CoordinatorHost) -> int:
    """Start the SuperLink (behind its terminator) and wait; SIGINT/SIGTERM stop both cleanly.

    The exit code is 0 after SIGINT/SIGTERM, and non-zero whenever the SuperLink or the terminator
    stopped unasked, so that a supervisor (compose's ``restart: unless-stopped``) starts the host again.
    """
    running: Running | None = None
    asked = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal asked
        asked = True
        if running is None:  # still starting: unwind `start`, which stops what it started
            raise KeyboardInterrupt
        running.process.send_signal(signum)

    # Before the start, so a signal while it waits for /health stops the SuperLink too, not just `up`.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        running = start(host)
    except KeyboardInterrupt:
        if asked:
            return 0
        raise
    log.info("SuperLink ready on %s", host.address, extra={"event": "superlink_ready"})
    process, terminator = running.process, running.terminator
    try:
        while True:
            try:
                code = process.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if terminator is not None and not terminator.alive and not asked:
                    log.error(
                        "The TLS terminator stopped; stopping the SuperLink.",
                        extra={"event": "terminator_stopped"},
                    )
                    running.stop()
                    return 1
    finally:
        if terminator is not None:
            terminator.stop()
    if asked:  # uvicorn shuts down cleanly, then dies of the signal it was sent (code -15): a clean stop
        log.info("SuperLink stopped on a signal", extra={"event": "superlink_stopped", "code": code})
        return 0 if code < 0 else code
    log.error(
        "flower-superlink exited unasked with code %s.", code, extra={"event": "superlink_died", "code": code}
    )
    return code or 1
