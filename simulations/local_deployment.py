"""A deployed fleet on one machine: the real coordinator and device hosts as processes on 127.0.0.1.

The same commands an operator and device owners run (docs/operator.md, docs/device.md), driven from
Python: ``fleetlora coordinator up``, ``device enroll``, ``coordinator devices enroll``, ``device up``,
``coordinator round start``. The integration test and ``benchmarks/deployed_round.py`` use it to
prove the deployment works, and to time it, without Docker.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fleetlora.common.host_config import CoordinatorHost, load_host_config
from fleetlora.coordinator import flower_control
from fleetlora.coordinator.certs import CA_CERT
from fleetlora.coordinator.storage import Storage

T = TypeVar("T")

# Above Ray's worker ports (10002-19999 by default) and below Linux's ephemeral ports (32768 up), which
# outgoing connections take: a port found free here stays free unless another fleet picks it.
PORT_RANGE = range(20000, 32000)
PR_SET_PDEATHSIG = 1  # prctl(2), Linux


def free_ports(count: int, attempts: int = 200) -> int:
    """The first of ``count`` consecutive ports that nothing on this machine listens on now.

    Blocks are drawn at random and bind-probed, so fleets started side by side (pytest-xdist workers,
    a benchmark beside the tests) do not collide, as fixed or pid-derived ports did.
    """
    if not 0 < count <= len(PORT_RANGE):
        raise ValueError(f"count must be 1 to {len(PORT_RANGE)}, got {count}")
    draw = random.SystemRandom()
    for _ in range(attempts):
        first = draw.randrange(PORT_RANGE.start, PORT_RANGE.stop - count)
        with ExitStack() as held:
            try:
                for port in range(first, first + count):
                    held.enter_context(socket.socket()).bind(("0.0.0.0", port))
            except OSError:
                continue
            return first
    raise RuntimeError(f"no {count} consecutive free ports in {attempts} tries: is the machine out of ports?")


def fleetlora(*args: str, cwd: Path, timeout: float = 120) -> str:
    """Run one ``fleetlora`` command; its stdout, or AssertionError with its stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "fleetlora", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise AssertionError(f"fleetlora {' '.join(args)} exited {done.returncode}: {done.stderr[-3000:]}")
    return done.stdout


def wait_for(predicate: Callable[[], T], timeout: float, what: str, poll: float = 0.5) -> T:
    """The first truthy value of ``predicate()``; AssertionError after ``timeout`` seconds."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass(frozen=True)
class Failover:
    """What a SIGKILL of the coordinator host under a running round cost (:meth:`LocalFleet.fail_over`)."""

    superlink_seconds: float  # from the kill until the restarted SuperLink answered on its port
    devices_seconds: float  # from the kill until every device was online again
    rounds_before: list[int]  # the lineage's stored rounds when the host was killed
    rounds_after: list[int]  # ... once a run started after the restart had finished
    status_after: str  # how that run finished

    @property
    def lost(self) -> list[int]:
        """Rounds stored before the kill and gone after it."""
        return sorted(set(self.rounds_before) - set(self.rounds_after))

    @property
    def doubled(self) -> list[int]:
        """Rounds stored twice."""
        return sorted({r for r in self.rounds_after if self.rounds_after.count(r) > 1})


_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def _terminate_with_parent() -> None:
    """In the child, before ``exec``: Linux sends it SIGTERM when the thread that started it ends."""
    if _prctl is not None and _prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        os._exit(127)  # fails the start loudly rather than leave a host that could outlive its test


class Host:
    """A long-running ``fleetlora ... up`` in its own process group, logging to a file.

    On Linux the host is sent SIGTERM (and stops what it started, as on a service stop) when the
    thread that started it ends, so a test run or benchmark that is killed leaves no fleet behind: its
    own cleanup never runs then, and a host in a session of its own would outlive it. Only hosts started
    from the main thread get this (as tests and benchmarks start them): a worker thread that ended would
    take its hosts with it.
    """

    def __init__(self, args: list[str], cwd: Path, log: Path) -> None:
        watched = _prctl is not None and threading.current_thread() is threading.main_thread()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fleetlora", *args],
            cwd=cwd,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the host and everything it starts, as one group
            preexec_fn=_terminate_with_parent if watched else None,
        )

    def kill(self) -> None:
        """SIGKILL the whole group, as a power cut would."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class LocalFleet:
    """A coordinator host and ``devices`` device hosts under ``folder``, with their config files.

    ``port`` 0 (the default) takes a free block of ports (:func:`free_ports`): the coordinator's
    public port, then the SuperLink's (+1), metrics (+90), console (+91) and each device's runtime
    port (+100 + i).
    """

    folder: Path
    port: int = 0
    devices: int = 2
    federation: dict[str, Any] = field(default_factory=dict)  # run config of `round start`
    warm_clientapp: bool = True
    # Each device's sensors (common/device_settings.py): its devices share one machine, where each would
    # see the others' training as foreground load, so they read none unless a test drives them (file:PATH).
    sensors: tuple[str, ...] = ()
    hosts: dict[str, Host] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.port:
            self.port = free_ports(101 + self.devices)
        self.folder.mkdir(parents=True, exist_ok=True)
        federation = "\n".join(f"{k} = {_toml(v)}" for k, v in self.federation.items())
        self.config.write_text(
            f'[coordinator]\nport = {self.port}\nstate-dir = "coordinator"\n'
            f"metrics-port = {self.metrics_port}\nconsole-port = {self.console_port}\n\n"
            f"[federation]\n{federation}\n"
        )
        for i in range(1, self.devices + 1):
            (self.folder / f"device-{i}.toml").write_text(
                f'[device]\ncoordinator = "127.0.0.1:{self.port}"\ndevice-id = "device-{i}"\n'
                f'state-dir = "device-{i}"\nca-cert = "coordinator/certs/ca.crt"\n'
                f'coordinator-keys = "coordinator/keys"\ndata = "builtin"\nupload-consent = true\n'
                f"runtime-port = {self.port + 100 + i}\nwarm-clientapp = {_toml(self.warm_clientapp)}\n"
                f"sensors = {_toml(self.sensors[i - 1] if self.sensors else 'none')}\n"
            )

    @property
    def config(self) -> Path:
        return self.folder / "fleetlora.toml"

    @property
    def metrics_port(self) -> int:
        """Beside the fleet's other ports, so fleets side by side do not share the default 9464."""
        return self.port + 90

    @property
    def console_port(self) -> int:
        return self.port + 91

    @property
    def coordinator(self) -> CoordinatorHost:
        return load_host_config(self.config).coordinator

    def start_coordinator(self, timeout: float = 60) -> float:
        """Start (or restart) the coordinator host; seconds until its SuperLink answers (the operator
        CLI's control API included)."""
        started = time.monotonic()
        self._launch_coordinator()
        wait_for(self.superlink_answers, timeout, "the SuperLink", poll=0.1)
        wait_for(lambda: self.runs() is not None, timeout, "the SuperLink's control API")
        return time.monotonic() - started

    def _launch_coordinator(self) -> None:
        self.hosts["coordinator"] = Host(
            ["coordinator", "up", "--config", str(self.config)], self.folder, self.folder / "coordinator.log"
        )

    def enroll(self, i: int, *, register: bool = True) -> None:
        """The device makes its keys; the operator registers them (unless ``register`` is False)."""
        fleetlora(
            "device", "enroll", "--state-dir", f"device-{i}", "--device-id", f"device-{i}", cwd=self.folder
        )
        if register:
            fleetlora(
                "coordinator", "devices", "enroll", "--device-id", f"device-{i}",
                "--public-key", f"device-{i}/device-signing.pub",
                "--auth-key", f"device-{i}/supernode-auth.pub",
                "--config", str(self.config), cwd=self.folder,
            )  # fmt: skip

    def start_device(self, i: int) -> None:
        self.hosts[f"device-{i}"] = Host(
            ["device", "up", "--config", f"device-{i}.toml"], self.folder, self.folder / f"device-{i}.log"
        )

    def start(self, timeout: float = 120) -> None:
        """The whole fleet: coordinator up, every device enrolled and online."""
        self.start_coordinator()
        for i in range(1, self.devices + 1):
            self.enroll(i)
            self.start_device(i)
        self.wait_online(self.devices, timeout)

    def wait_online(self, count: int, timeout: float) -> float:
        started = time.monotonic()
        wait_for(lambda: self.online() == count, timeout, f"{count} devices online")
        return time.monotonic() - started

    def online(self) -> int:
        try:
            return sum(n["status"] == "online" for n in flower_control.list_nodes(self.coordinator))
        except flower_control.ControlError:
            return 0

    def runs(self) -> list[dict[str, Any]] | None:
        try:
            return flower_control.list_runs(self.coordinator)
        except flower_control.ControlError:
            return None

    def status(self, run_id: int) -> str:
        return next((r["status"] for r in self.runs() or [] if int(r["run-id"]) == run_id), "")

    def start_run(self, *options: str) -> int:
        out = fleetlora(
            "coordinator", "round", "start", "--config", str(self.config), *options, cwd=self.folder
        )
        return int(out.split("started run ")[1].split(";")[0])

    def wait_finished(self, run_id: int, timeout: float) -> str:
        return wait_for(
            lambda: s if (s := self.status(run_id)).startswith("finished") else "",
            timeout,
            f"run {run_id} to finish",
        )

    def superlink_answers(self) -> bool:
        """Whether the SuperLink answers its health check over TLS (what a load balancer would ask)."""
        host = self.coordinator
        try:  # the CA certificate too: a first start writes it
            context = ssl.create_default_context(cafile=str(host.certs_dir / CA_CERT))
            with urllib.request.urlopen(f"https://{host.address}/health", context=context, timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError, ssl.SSLError):
            return False

    def fail_over(self, online: int, restart_delay: float = 1.0, timeout: float = 240) -> Failover:
        """SIGKILL the coordinator host in the second round of a two-round run, start it again after
        ``restart_delay`` seconds as its supervisor would (systemd's ``RestartSec=1`` in
        deploy/fleetlora-coordinator.service; Docker's restart policy in docker-compose.yml), wait for
        the SuperLink and the ``online`` devices, then run one round and report what was kept."""
        versions = Storage.open(self.coordinator.database_url, self.coordinator.tenant).versions
        trained = max((v.round for v in versions.all()), default=0) + 1  # round 0: no training
        self.start_run("--rounds", "2")
        wait_for(lambda: any(v.round >= trained for v in versions.all()), timeout, "the run's first round")
        rounds_before = [v.round for v in versions.all()]
        self.hosts["coordinator"].kill()  # the second round is running: its devices are training
        killed = time.monotonic()
        time.sleep(restart_delay)
        self._launch_coordinator()
        wait_for(self.superlink_answers, timeout, "the restarted SuperLink", poll=0.1)
        superlink = time.monotonic() - killed
        wait_for(lambda: self.online() == online, timeout, f"{online} devices online", poll=0.2)
        devices = time.monotonic() - killed
        status = self.wait_finished(self.start_run(), timeout)
        rounds_after = [v.round for v in versions.all()]
        return Failover(round(superlink, 2), round(devices, 2), rounds_before, rounds_after, status)

    def stop(self) -> None:
        for host in self.hosts.values():
            host.stop()


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)
