"""How many devices one coordinator host holds, and how fast its databases grow (issue 18's sizing).

**The SuperLink.** A real coordinator host (``fleetlora coordinator up``: the TLS 1.3 terminator in the
host's process, a ``flower-superlink`` with SuperNode authentication and its state database) and N bare
SuperNodes in this process. A bare node makes the calls a ``flower-supernode`` makes, with Flower's own
Fleet client and interceptors (every request signed with the node's P-384 key, as SuperNode auth needs):
its key registered through the Control API (what ``coordinator devices enroll`` asks the ``flwr`` CLI to
do), the node activated, then a pull every 3 s (Flower's SuperNode sleeps 3 s after a pull that finds
no message) and a heartbeat every 30 s. No ClientApp, no model: what the host pays for a connected device
with nothing to do, which is what most of a fleet is most of the time. At each N, over a window, the CPU
seconds per second and the memory (RSS) of the SuperLink and of the host process, the pulls served, the
pull latency the nodes saw and the connections the host holds open. Then a burst: every node pulls back
to back, and the pulls per second served is what one SuperLink can answer.

From those, least squares over the N measured:

- ``cpu_seconds_per_device_second``: the slope of the host's CPU (SuperLink, SuperExec and the host's
  own process) against connected idle devices; the SuperLink is one process, so its ceiling is the
  burst's, not this slope's inverse;
- ``rss_mb_per_device``: the slope of host + SuperLink memory against devices;
- ``devices_at_burst_rate``: burst pulls per second × 3 s, the idle devices one SuperLink answers before
  their pulls queue;
- ``terminator_device_ceiling``: the terminator's connection limit (``Limits.within_open_files()``, as
  the host, which inherits this process's open-file limit, computes it) over the connections a device
  holds.

**The databases.** Three ``fleetlora simulate`` runs of one fleet of 2K devices (tiny model, built-in
corpus, every new version sent to every device as on a deployed fleet: ``distribute-to = connected``):
K devices a round for R rounds, 2K for R, and K for 2R. Each table's bytes in use (SQLite's ``dbstat``)
give what a device-round adds, what a round adds besides, and what a device costs. The SuperLink's state
database is measured before and after the N registrations: bytes per registered device.

Run from the repository root::

    .venv/bin/python benchmarks/fleet_sizing.py [--json benchmarks/results/fleet_sizing.json]

``--quick`` (what ``make bench`` runs) measures fewer, smaller fleets and writes
benchmarks/results/quick/fleet_sizing.json; ``--smoke`` (what ``make test`` runs) is the smallest real
run, writing nothing unless ``--json`` is given. Progress goes to stderr; the JSON result is the last
line of stdout.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest.mock import patch

import httpx
import psutil
from flwr.cli.flower_config import read_superlink_connection
from flwr.cli.utils import init_http_client_from_connection
from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL
from flwr.proto.control_pb2 import RegisterNodeRequest
from flwr.proto.fleet_pb2 import ActivateNodeRequest, DeactivateNodeRequest, PullMessagesRequest
from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest
from flwr.proto.node_pb2 import Node
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes
from flwr.supernode.fleet_http_client import FleetHttpClient
from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor
from results_io import default_path, emit, load_average, load_before_after, machine

from fleetlora.coordinator.certs import CA_CERT
from fleetlora.coordinator.superlink import CONNECTION
from fleetlora.coordinator.tls_terminator import Limits
from fleetlora.simulations.local_deployment import LocalFleet, wait_for
from fleetlora.simulations.runner import SimulationConfig, simulate

IDLE_PULL_SECONDS = 3.0  # flwr 1.41's SuperNode: time.sleep(3) after a pull that found no message
RESULTS = Path("benchmarks/results")


@dataclass(frozen=True)
class Mode:
    levels: tuple[int, ...]  # connected bare SuperNodes, measured in turn
    window: float  # seconds each level is measured over, after one idle pull period to settle
    burst: float  # seconds of back-to-back pulls at the largest level
    devices_per_round: int  # K; the second database run has 2K
    rounds: int


MODES = {
    "full": Mode(levels=(0, 50, 150, 250, 350), window=30.0, burst=10.0, devices_per_round=8, rounds=3),
    "quick": Mode(levels=(0, 40, 120), window=15.0, burst=6.0, devices_per_round=4, rounds=2),
    "smoke": Mode(levels=(0, 4), window=4.0, burst=2.0, devices_per_round=2, rounds=1),
}


def progress(message: str) -> None:
    print(f"[fleet_sizing] {message}", file=sys.stderr, flush=True)


@dataclass
class BareNode:
    """One SuperNode's Fleet API traffic, with nothing behind it (see the module docstring)."""

    address: str
    ca_pem: bytes
    keys: Any = field(default_factory=generate_key_pairs)
    pulls: int = 0
    latencies: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def public_key(self) -> bytes:
        return public_key_to_bytes(self.keys[1])

    def run(self, online: threading.Event, stop: threading.Event, burst: threading.Event) -> None:
        """Activate, then pull every 3 s (back to back while ``burst`` is set) until ``stop``, with Flower's
        own heartbeat thread beside it, as ``flower-supernode`` has. ``stop`` is set with ``burst``, so
        neither waits out a sleep."""
        interceptors = [
            RuntimeVersionHttpInterceptor(component_name="SuperNode"),
            NodeAuthHttpInterceptor(*self.keys),
        ]
        try:
            with FleetHttpClient.from_server_address(
                self.address, False, self.ca_pem, interceptors
            ) as client:
                every = HEARTBEAT_DEFAULT_INTERVAL
                activated = client.ActivateNode(
                    ActivateNodeRequest(public_key=self.public_key, heartbeat_interval=every)
                )
                node = Node(node_id=activated.node_id)
                beat = SendNodeHeartbeatRequest(node=node, heartbeat_interval=every)

                def heartbeat() -> bool:  # False: Flower's sender retries with backoff
                    try:
                        return bool(client.SendNodeHeartbeat(beat).success)
                    except httpx.HTTPError:
                        return False

                heartbeats = HeartbeatSender(heartbeat)
                heartbeats.start()
                online.set()
                try:
                    while not stop.is_set():
                        started = time.perf_counter()
                        client.PullMessages(PullMessagesRequest(node=node))
                        self.latencies.append(time.perf_counter() - started)
                        self.pulls += 1
                        if not burst.is_set():
                            burst.wait(IDLE_PULL_SECONDS)
                finally:
                    heartbeats.stop()
                client.DeactivateNode(DeactivateNodeRequest(node_id=node.node_id))
        except Exception as error:  # counted and reported: one node's failure is a figure
            self.error = f"{type(error).__name__}: {error}"
            online.set()


class Swarm:
    """Bare nodes started in batches, each on a thread of its own, all stopped together."""

    def __init__(self, fleet: LocalFleet) -> None:
        host = fleet.coordinator
        self.address = host.address
        self.ca_pem = (host.certs_dir / CA_CERT).read_bytes()
        self.nodes: list[BareNode] = []
        self.threads: list[threading.Thread] = []
        self.stop = threading.Event()
        self.burst = threading.Event()
        with patch.dict(os.environ, {"FLWR_HOME": str(host.flwr_home.resolve())}):  # where the CLI reads it
            self.control = init_http_client_from_connection(read_superlink_connection(CONNECTION))

    def grow_to(self, count: int, timeout: float = 300) -> None:
        """Register, activate and start nodes until ``count`` pull."""
        while len(self.nodes) < count:
            node = BareNode(self.address, self.ca_pem)
            self.control.RegisterNode(
                RegisterNodeRequest(public_key=node.public_key, name=f"bare-{len(self.nodes)}")
            )
            online = threading.Event()
            thread = threading.Thread(target=node.run, args=(online, self.stop, self.burst), daemon=True)
            thread.start()
            self.threads.append(thread)
            if not online.wait(timeout):
                raise AssertionError(f"bare node {len(self.nodes)} was not activated within {timeout:.0f} s")
            if node.error:
                raise AssertionError(f"bare node {len(self.nodes)} failed: {node.error}")
            self.nodes.append(node)

    def pulls(self) -> int:
        return sum(node.pulls for node in self.nodes)

    def latencies_since(self, marks: list[int]) -> list[float]:
        return [s for node, mark in zip(self.nodes, marks, strict=False) for s in node.latencies[mark:]]

    def close(self, timeout: float = 60) -> None:
        self.stop.set()
        self.burst.set()  # wakes every sleeping node
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self.control.close()


@dataclass(frozen=True)
class Usage:
    """CPU seconds and memory of the coordinator host's processes at one moment."""

    superlink_cpu: float
    others_cpu: float  # the host's own process (terminator, metrics, console) and the SuperLink's SuperExec
    pollers_cpu: float  # the host's finished children: the `flwr supernode list` it runs every 15 s
    rss_bytes: int  # all of them
    connections: int


@dataclass(frozen=True)
class HostProcesses:
    host: psutil.Process  # `fleetlora coordinator up`
    superlink: psutil.Process
    superexec: psutil.Process  # started by the SuperLink; polls for runs to start every 0.1 s here

    @property
    def others(self) -> tuple[psutil.Process, psutil.Process]:
        return self.host, self.superexec


def host_processes(fleet: LocalFleet) -> HostProcesses:
    host = psutil.Process(fleet.hosts["coordinator"].process.pid)

    def found() -> HostProcesses | None:
        try:  # the host's short-lived `flwr` pollers may be gone before their command line is read
            children = [(p, " ".join(p.cmdline()[:2])) for p in host.children(recursive=True)]
            family = {name: p for p, line in children for name in _FLOWER if name in line}
        except psutil.Error:
            return None
        if set(family) != set(_FLOWER):
            return None
        return HostProcesses(host, family["flower-superlink"], family["flower-superexec"])

    return wait_for(found, 30, "the SuperLink and its SuperExec")


_FLOWER = ("flower-superlink", "flower-superexec")


def usage(processes: HostProcesses, port: int) -> Usage:
    host, superlink = processes.host, processes.superlink
    connections = sum(
        c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port
        for c in host.net_connections(kind="tcp")
    )
    own = host.cpu_times()
    return Usage(
        superlink_cpu=sum(superlink.cpu_times()[:2]),
        others_cpu=sum(sum(p.cpu_times()[:2]) for p in processes.others),
        pollers_cpu=own.children_user + own.children_system,
        rss_bytes=sum(p.memory_info().rss for p in (superlink, *processes.others)),
        connections=connections,
    )


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def measure(swarm: Swarm, processes: HostProcesses, port: int, window: float) -> dict[str, Any]:
    marks = [len(node.latencies) for node in swarm.nodes]
    me = psutil.Process()
    pulls, before, started = swarm.pulls(), usage(processes, port), time.monotonic()
    mine = sum(me.cpu_times()[:2])
    time.sleep(window)
    after, seconds = usage(processes, port), time.monotonic() - started
    mine = sum(me.cpu_times()[:2]) - mine
    latencies = swarm.latencies_since(marks)
    served = swarm.pulls() - pulls
    # What serves the devices; the pollers' cost is the same at any N and is reported beside it.
    serving = after.superlink_cpu + after.others_cpu - before.superlink_cpu - before.others_cpu
    return {
        "devices": len(swarm.nodes),
        "seconds": round(seconds, 2),
        "pulls_per_s": round(served / seconds, 2),
        "cpu_seconds_per_s": round(serving / seconds, 4),
        "superlink_cpu_seconds_per_s": round((after.superlink_cpu - before.superlink_cpu) / seconds, 4),
        "pollers_cpu_seconds_per_s": round((after.pollers_cpu - before.pollers_cpu) / seconds, 4),
        "cpu_ms_per_pull": round(1000 * serving / served, 3) if served else None,
        # the bare nodes' own process: near a core, it (not the SuperLink) may be what limits a burst
        "bare_nodes_cpu_seconds_per_s": round(mine / seconds, 4),
        "rss_mb": round(after.rss_bytes / 2**20, 1),
        "connections": after.connections,
        "pull_latency_ms": {
            "p50": _ms(percentile(latencies, 0.5)),
            "p95": _ms(percentile(latencies, 0.95)),
        },
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 2)


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y on x."""
    xs, ys = zip(*points, strict=True)
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else 0.0


def superlink_sizing(scratch: Path, mode: Mode) -> dict[str, Any]:
    fleet = LocalFleet(scratch / "superlink", devices=0)
    try:
        progress("coordinator host")
        fleet.start_coordinator()
        processes = host_processes(fleet)
        state_db = fleet.coordinator.superlink_db
        swarm = Swarm(fleet)
        try:
            levels = []
            with sqlite_tables(state_db) as state_tables:
                db_before = sum(state_tables().values())
            for count in mode.levels:
                started = time.monotonic()
                swarm.grow_to(count)
                progress(f"{count} bare SuperNodes online in {time.monotonic() - started:.1f} s; measuring")
                time.sleep(IDLE_PULL_SECONDS)  # every node has made its first idle pull
                levels.append(measure(swarm, processes, fleet.port, mode.window))
                progress(f"{levels[-1]}")
            registered = len(swarm.nodes)
            with sqlite_tables(state_db) as state_tables:
                db_after = sum(state_tables().values())
            progress(f"burst: {registered} nodes pulling back to back")
            swarm.burst.set()
            time.sleep(0.5)  # every node is awake (burst wakes the sleepers) and pulling
            burst = measure(swarm, processes, fleet.port, mode.burst)
            swarm.burst.clear()
            progress(f"{burst}")
            failed = [node.error for node in swarm.nodes if node.error]
        finally:
            swarm.close()
    finally:
        fleet.stop()
    cpu_slope = slope([(lv["devices"], lv["cpu_seconds_per_s"]) for lv in levels])
    rss_slope = slope([(lv["devices"], lv["rss_mb"]) for lv in levels])
    connections = levels[-1]["connections"] / levels[-1]["devices"] if levels[-1]["devices"] else None
    ceiling = Limits.within_open_files().max_connections
    return {
        "levels": levels,
        "burst": burst,
        "failed_nodes": failed,
        "cpu_seconds_per_device_second": round(cpu_slope, 6),
        "rss_mb_per_device": round(rss_slope, 3),
        "devices_at_burst_rate": round(burst["pulls_per_s"] * IDLE_PULL_SECONDS),
        "connections_per_device": round(connections, 2) if connections else None,
        "terminator_max_connections": ceiling,
        "terminator_device_ceiling": round(ceiling / connections) if connections else None,
        "superlink_db_bytes_per_registered_device": round((db_after - db_before) / registered)
        if registered
        else None,
    }


@contextmanager
def sqlite_tables(path: Path) -> Iterator[Callable[[], dict[str, int]]]:
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        # bytes in use (payload and b-tree overhead), not whole pages, so small growth shows
        yield lambda: dict(
            connection.execute("SELECT name, SUM(pgsize - unused) FROM dbstat GROUP BY name").fetchall()
        )
    finally:
        connection.close()


# One row a device, kept current: these do not grow with rounds.
PER_DEVICE_TABLES = frozenset(
    {"devices", "device_updates", "sqlite_autoindex_devices_1", "sqlite_autoindex_device_updates_1"}
)


def database_growth(scratch: Path, mode: Mode) -> dict[str, Any]:
    """Three simulations of one fleet: K devices a round for R rounds, 2K for R, and K for 2R. Each
    table's bytes give what a device-round adds (2K less K), what a round adds besides (2R less R, less
    its device-rounds), and what a device costs (the tables of one row a device)."""
    k, rounds = mode.devices_per_round, mode.rounds
    fleet, runs = 2 * k, {}
    for per_round, count in ((k, rounds), (2 * k, rounds), (k, 2 * rounds)):
        progress(f"simulation: {count} rounds of {per_round} of {fleet} devices, each version sent to all")
        out = scratch / f"db-{per_round}x{count}"
        simulate(SimulationConfig(
            devices=fleet,
            out=out,
            settings={"model": "tiny", "data": "builtin", "rounds": count, "partition": "iid",
                      "devices-per-round": per_round, "min-devices": per_round, "local-steps": 2,
                      "distribute-to": "connected"},
        ))  # fmt: skip
        with sqlite_tables(out / "fleetlora.db") as tables:
            runs[f"{per_round}x{count}"] = tables()
        blobs = sqlite3.connect(f"file:{out / 'fleetlora.db'}?mode=ro", uri=True)
        try:
            adapter, package = blobs.execute(
                "SELECT (SELECT AVG(adapter_bytes) FROM model_versions),"
                " (SELECT SUM(package_bytes) FROM update_packages) / (SELECT COUNT(*) FROM rounds)"
            ).fetchone()
        finally:
            blobs.close()
    base, wide, long = runs[f"{k}x{rounds}"], runs[f"{2 * k}x{rounds}"], runs[f"{k}x{2 * rounds}"]
    tables = set(base) | set(wide) | set(long)
    per_device_round = {t: (wide.get(t, 0) - base.get(t, 0)) / (k * rounds) for t in tables}
    per_round = {
        t: (long.get(t, 0) - base.get(t, 0) - per_device_round[t] * k * rounds) / rounds for t in tables
    }
    per_device = sum(b for t, b in base.items() if t in PER_DEVICE_TABLES)
    return {
        "fleet": fleet,
        "runs": {name: {"bytes": sum(sizes.values())} for name, sizes in runs.items()},
        "table_bytes": runs,
        "bytes_per_device_round": round(sum(per_device_round.values())),
        "bytes_per_round": round(sum(per_round.values())),
        "bytes_per_device": round(per_device / fleet),
        # what a round's bytes are mostly made of, on this model: the version's adapter and its packages
        "adapter_bytes": round(adapter),
        "package_bytes_per_round": round(package),
        "bytes_per_device_round_by_table": {t: round(b) for t, b in per_device_round.items() if round(b)},
        "bytes_per_round_by_table": {t: round(b) for t, b in per_round.items() if round(b)},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="JSON to write (default results/fleet_sizing.json)")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument(
        "--quick", action="store_true", help="fewer, smaller fleets; written to results/quick/"
    )
    choice.add_argument("--smoke", action="store_true", help="the smallest real run; nothing written")
    args = parser.parse_args(argv)
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    mode = MODES[name]
    if not args.smoke:
        args.json = args.json or default_path("fleet_sizing", args.quick, RESULTS)
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="fleetlora-sizing-") as folder:
        superlink = superlink_sizing(Path(folder), mode)
        database = database_growth(Path(folder), mode)
    result = {
        "benchmark": "fleet_sizing",
        "command": shlex.join(sys.orig_argv),
        "mode": name,
        "idle_pull_seconds": IDLE_PULL_SECONDS,
        "superlink": superlink,
        "database": database,
        "machine": machine(),
        "load_average": load_before_after(load_before),
    }
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
