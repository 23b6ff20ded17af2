"""Prometheus metrics of the fleet, read from fleetlora's database at every scrape.

:class:`FleetCollector` keeps no counts of its own: each scrape asks the database of the host's tenant
(rounds, phases, devices, packages, the privacy ledger), so any process can serve it and a restart
loses nothing. The registry also holds prometheus_client's process and platform collectors (CPU,
memory, open files). :func:`serve_metrics` serves ``/metrics`` with :class:`fleetlora.common.web.WebServer`;
``coordinator up`` starts it in a thread (host settings ``metrics-host``, ``metrics-port``).
"""

from __future__ import annotations

import logging
import re
import statistics
import threading
from collections import Counter
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, make_asgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.routing import Mount

from fleetlora.common.errors import ConfigError, FleetloraError
from fleetlora.common.host_config import CoordinatorHost
from fleetlora.common.web import WebServer
from fleetlora.coordinator.storage import DeviceUpdateInfo, RoundInfo, Storage
from fleetlora.coordinator.storage.ledgers import COMPLETED, ENDED, FAILED, PHASES

ONLINE_SECONDS = 5.0  # a scrape waits this long for the devices-online count, then goes without it
MAX_REASONS = 10  # drop reasons of the last round kept as label values; the rest count as "other"
MAX_REASON_CHARS = 60
log = logging.getLogger(__name__)


class FleetCollector(Collector):
    """The fleet's figures for one tenant, from the database; ``online`` counts connected devices."""

    def __init__(self, storage: Storage, online: Callable[[], int] | None = None) -> None:
        self.storage = storage
        self.online = online

    def collect(self) -> Iterator[Metric]:
        try:  # read whole before anything is yielded: a failing database gives no partial figures
            updates = self.storage.devices.updates()
            metrics = [
                *self._rounds(),
                *self._phases(),
                *self._devices(updates),
                *self._packages(updates),
                *self._privacy(),
            ]
            read = True
        except Exception as exc:  # a damaged row as much as a lost server: reported as the database down
            log.warning("metrics: cannot read the database: %s", exc, extra={"event": "metrics_db_error"})
            metrics, read = [], False
        yield from metrics
        yield _gauge("fleetlora_database_up", "1 when this scrape read fleetlora's database", read)
        online = _within(ONLINE_SECONDS, self.online) if self.online else None
        if online is not None:
            yield _gauge("fleetlora_devices_online", "Devices connected to the SuperLink now", online)

    def _rounds(self) -> Iterator[Metric]:
        rounds = self.storage.ledgers.rounds()
        states = Counter(r.status for r in rounds)
        total = CounterMetricFamily(
            "fleetlora_rounds", "Rounds recorded, by how they ended", labels=["state"]
        )
        for state in (COMPLETED, FAILED):
            total.add_metric([state], states[state])
        yield total
        yield CounterMetricFamily(
            "fleetlora_upload_bytes",
            "Bytes of updates devices sent, all rounds",
            sum(r.upload_bytes for r in rounds),
        )
        last = rounds[-1] if rounds else None
        yield _gauge(
            "fleetlora_round_latest",
            "The newest recorded round's number (0: none yet)",
            last.round if last else 0,
        )
        if last is None:
            return
        yield _gauge("fleetlora_last_round_devices_sampled", "Devices the last round sampled", last.sampled)
        yield _gauge(
            "fleetlora_last_round_devices_answered", "Devices whose update the last round used", last.received
        )
        yield _gauge(
            "fleetlora_last_round_upload_bytes",
            "Bytes of updates devices sent in the last round",
            last.upload_bytes,
        )
        yield _dropped(last)

    def _phases(self) -> Iterator[Metric]:
        phases = self.storage.ledgers.phases(last_rounds=1)
        if not phases:
            return
        yield _gauge(
            "fleetlora_round_current",
            "The round the phase metrics describe (the newest begun)",
            phases[-1].round,
        )
        seconds = GaugeMetricFamily(
            "fleetlora_round_phase_seconds",
            "Seconds each phase of the newest round took (so far)",
            labels=["phase"],
        )
        for phase in phases:
            if phase.phase in PHASES:
                seconds.add_metric([phase.phase], phase.seconds)
        yield seconds
        current = GaugeMetricFamily(
            "fleetlora_round_phase",
            "1 for the phase the newest round is in (completed or failed once ended)",
            labels=["phase"],
        )
        for name in (*PHASES, *ENDED):
            current.add_metric([name], int(name == phases[-1].phase))
        yield current

    def _devices(self, updates: list[DeviceUpdateInfo]) -> Iterator[Metric]:
        yield _gauge(
            "fleetlora_devices_enrolled",
            "Devices enrolled in this tenant",
            len(self.storage.devices.enrolled()),
        )
        reports = Counter(u.status for u in updates)
        family = GaugeMetricFamily(
            "fleetlora_devices_update_status", "Devices by their last update report", labels=["status"]
        )
        for status, count in sorted(reports.items()):
            family.add_metric([status], count)
        yield family

    def _packages(self, updates: list[DeviceUpdateInfo]) -> Iterator[Metric]:
        latest = self.storage.packages.latest()
        if latest is None:
            return
        applied = sum(1 for u in updates if u.status == "applied" and u.version_id == latest.to_version)
        yield _gauge("fleetlora_package_bytes", "Bytes of the newest update package", latest.package_bytes)
        yield _gauge(
            "fleetlora_package_ratio", "The newest package's bytes / the base model's bytes", latest.ratio
        )
        yield _gauge(
            "fleetlora_package_bytes_out",
            "Bytes the newest package sent to the devices that applied its version",
            applied * latest.package_bytes,
        )

    def _privacy(self) -> Iterator[Metric]:
        spent = list(self.storage.ledgers.epsilon_spent().values())
        if spent:
            yield _gauge("fleetlora_epsilon_spent_max", "The largest ε a DP device has spent", max(spent))
            yield _gauge(
                "fleetlora_epsilon_spent_median",
                "The median ε DP devices have spent",
                statistics.median(spent),
            )


def serve_metrics(host: CoordinatorHost, online: Callable[[], int] | None = None) -> WebServer:
    """A server of ``/metrics`` for ``host``'s tenant on metrics-host:metrics-port (0: a free port);
    run its ``serve_forever`` in a thread."""
    if not 0 <= host.metrics_port < 65536:
        raise ConfigError(
            f"metrics-port {host.metrics_port}: give a port from 1 to 65535 (0 turns metrics off)."
        )
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    registry.register(FleetCollector(Storage.open(host.database_url, host.tenant, reader=True), online))
    app = Starlette(routes=[Mount("/metrics", app=make_asgi_app(registry))])
    return WebServer(app, host=host.metrics_host, port=host.metrics_port)


def start_metrics(host: CoordinatorHost, online: Callable[[], int] | None = None) -> str:
    """Serve ``host``'s /metrics from a daemon thread (it ends with the process), counting online
    devices with ``online``; the URL to scrape."""
    server = serve_metrics(host, online)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    url = f"http://{host.metrics_host}:{server.server_address[1]}/metrics"
    log.info("Serving metrics on %s", url, extra={"event": "metrics_started", "url": url})
    return url


def reason_kind(reason: str) -> str:
    """A drop reason as a label value: its kind before any ``:`` or ``(``, numbers as ``#``, cut short."""
    kind = re.split(r"[:(]", reason, maxsplit=1)[0].lower()
    kind = re.sub(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?", "#", kind)
    kind = re.sub(r"[^a-z#' -]+", " ", kind)
    return " ".join(kind.split())[:MAX_REASON_CHARS] or "unknown"


def _dropped(last: RoundInfo) -> Metric:
    """The last round's drops by reason kind: at most MAX_REASONS kinds, the rest as "other"."""
    kinds = Counter(
        reason_kind(str(d.get("reason", ""))) if isinstance(d, dict) else "unknown" for d in last.dropped
    )
    family = GaugeMetricFamily(
        "fleetlora_last_round_devices_dropped",
        "Devices the last round left out, by reason",
        labels=["reason"],
    )
    common = kinds.most_common(MAX_REASONS)
    for kind, count in common:
        family.add_metric([kind], count)
    if other := sum(kinds.values()) - sum(count for _, count in common):
        family.add_metric(["other"], other)
    return family


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _within(seconds: float, call: Callable[[], int]) -> int | None:
    """``call()``'s count, or None when it fails or has not answered within ``seconds`` (a stuck call
    is left to end in its daemon thread: a scrape must not hang on the SuperLink)."""
    answer: list[int] = []

    def ask() -> None:
        try:
            answer.append(int(call()))
        except FleetloraError as exc:  # the SuperLink down or not asked yet: the gauge is left out
            log.debug("metrics: online devices unknown: %s", exc)
        except Exception as exc:  # anything else: the scrape goes on without it, and says so
            log.warning(
                "metrics: cannot count online devices: %s", exc, extra={"event": "metrics_online_error"}
            )

    thread = threading.Thread(target=ask, name="metrics-online", daemon=True)
    thread.start()
    thread.join(seconds)
    return answer[0] if answer else None
