"""/metrics over real HTTP, read from a real SQLite database filled through the storage API.

Every figure is checked at its exact value, for the host's tenant only; a devices-online count that
fails or hangs, and a database that cannot be read, leave the scrape answering.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text, update

from fleetlora.common.errors import ConfigError
from fleetlora.common.host_config import CoordinatorHost
from fleetlora.common.package import Manifest
from fleetlora.coordinator import metrics
from fleetlora.coordinator.metrics import reason_kind, serve_metrics
from fleetlora.coordinator.models import RoundPhase
from fleetlora.coordinator.storage import NewVersion, RoundReport, Storage
from fleetlora.coordinator.storage.ledgers import ENDED, PHASES, PrivacySpend

REPO = Path(__file__).resolve().parents[2]
BASE_BYTES = 1000
PHASE_START = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _version(lineage: str, parent: int | None, round_number: int) -> NewVersion:
    return NewVersion(
        lineage=lineage, round=round_number, parent_id=parent, base_model_sha256="b" * 64,
        adapter={"w": torch.full((2,), float(round_number))}, participants={}, metrics={},
    )  # fmt: skip


def _manifest(lineage: str, tenant: str, from_version: int | None, to_version: int) -> Manifest:
    now = datetime.now(UTC)
    return Manifest(
        tenant=tenant, lineage=lineage, model={"name": "tiny"}, base_sha256="b" * 64, base_bytes=BASE_BYTES,
        from_version=from_version, to_version=to_version, sequence=to_version, created=now.isoformat(),
        expires=(now + timedelta(days=7)).isoformat(), payload_sha256="0" * 64, payload_length=1,
        codec="fp32+zstd", reconstruction_error=0.0,
    )  # fmt: skip


def _spend(device: str, epsilon: float) -> PrivacySpend:
    return PrivacySpend(device, epsilon, 1e-5, 1.1, 0.5, 10, 0)


def _fill(url: str) -> None:
    """Tenant "default": 2 rounds (1 completed, 1 failed), 3 devices, 2 packages, 3 DP devices, round
    3 in training. Tenant "other": figures that must not show."""
    storage = Storage.open(url, "default")
    storage.versions.register_lineage("L", "default", {"name": "tiny"}, "b" * 64, BASE_BYTES)
    v0 = storage.versions.add(_version("L", None, 0))
    dropped = [
        {"node_id": "7", "reason": "declined: below this device's privacy floor (ε 8 > 4)"},
        {"node_id": "8", "reason": "declined: no record can afford ε 2.5"},
        {"node_id": "9", "reason": "delta norm 12.5 above the round's bound 3.1 (10 × median)"},
    ]
    v1 = storage.versions.commit_round(_version("L", v0.id, 1), RoundReport(5, 2, dropped, 300, 4.0))
    no_reply = [{"node_id": str(n), "reason": "no reply before the deadline"} for n in (7, 8)]
    storage.ledgers.record_failed_round("L", 2, RoundReport(2, 0, no_reply, 50, 9.0, error="quorum"))
    keys = [Ed25519PrivateKey.generate().public_key() for _ in range(3)]
    for n, key in enumerate(keys, 1):
        storage.devices.enroll(f"d{n}", "default", key, node_id=100 + n)
    storage.devices.record_update(
        "d1", tenant="default", node_id=101, status="applied", reason=None, version_id=v1.id
    )
    storage.devices.record_update(
        "d2", tenant="default", node_id=102, status="applied", reason=None, version_id=v1.id
    )
    storage.devices.record_update("d3", tenant="default", node_id=103, status="rejected", reason="expired")
    storage.packages.add(_manifest("L", "default", None, v1.id), b"f" * 400, cap=0.5, build_seconds=0.1)
    storage.packages.add(_manifest("L", "default", v0.id, v1.id), b"p" * 120, cap=0.5, build_seconds=0.1)
    storage.ledgers.record_privacy("L", 1, [_spend("d1", 1.0), _spend("d2", 2.0)])
    storage.ledgers.record_privacy("L", 2, [_spend("d3", 4.0)])
    storage.ledgers.enter_phase("L", 3, "sampling")
    training = storage.ledgers.enter_phase("L", 3, "training", total=3)
    storage.ledgers.advance_phase(training.id, 1)
    with storage.db.session() as session:  # fixed times, so the durations are exact
        session.execute(
            update(RoundPhase)
            .where(RoundPhase.phase == "sampling")
            .values(started_at=PHASE_START, finished_at=PHASE_START + timedelta(seconds=2))
        )
        session.execute(
            update(RoundPhase)
            .where(RoundPhase.phase == "training")
            .values(
                started_at=PHASE_START + timedelta(seconds=2), updated_at=PHASE_START + timedelta(seconds=32)
            )
        )
    other = Storage.open(url, "other")
    other.versions.register_lineage("M", "other", {"name": "tiny"}, "b" * 64, 10)
    m0 = other.versions.add(_version("M", None, 0))
    other.versions.commit_round(_version("M", m0.id, 1), RoundReport(9, 9, [], 5000, 1.0))
    other.devices.enroll("o1", "other", Ed25519PrivateKey.generate().public_key())
    other.ledgers.record_privacy("M", 1, [_spend("o1", 99.0)])
    storage.close()
    other.close()


@pytest.fixture
def host(tmp_path: Path, sqlite_url: str) -> CoordinatorHost:
    _fill(sqlite_url)
    return CoordinatorHost(state_dir=tmp_path, database=sqlite_url, tenant="default", metrics_port=0)


@pytest.fixture
def scrape(host: CoordinatorHost) -> Iterator[Callable[..., Samples]]:
    """Serve /metrics for ``host`` (with an online count) and scrape it over HTTP."""
    servers = []

    def scrape_with(online: Callable[[], int] | None = None, path: str = "/metrics") -> Samples:
        if not servers:
            server = serve_metrics(host, online)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            servers.append(server)
        port = servers[0].server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
            assert response.status == 200
            body = response.read().decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body)
            for sample in family.samples
        }

    yield scrape_with
    for server in servers:
        server.shutdown()
        server.server_close()


def test_every_figure_is_read_from_the_tenants_database(scrape: Callable[..., Samples]):
    samples = scrape(online=lambda: 2)
    fleet = {key: value for key, value in samples.items() if key[0].startswith("fleetlora_")}
    assert fleet == {
        ("fleetlora_rounds_total", (("state", "completed"),)): 1,
        ("fleetlora_rounds_total", (("state", "failed"),)): 1,
        ("fleetlora_upload_bytes_total", ()): 350,
        ("fleetlora_round_latest", ()): 2,
        ("fleetlora_last_round_devices_sampled", ()): 2,
        ("fleetlora_last_round_devices_answered", ()): 0,
        ("fleetlora_last_round_upload_bytes", ()): 50,
        ("fleetlora_last_round_devices_dropped", (("reason", "no reply before the deadline"),)): 2,
        ("fleetlora_round_current", ()): 3,
        ("fleetlora_round_phase_seconds", (("phase", "sampling"),)): 2.0,
        ("fleetlora_round_phase_seconds", (("phase", "training"),)): 30.0,
        **{("fleetlora_round_phase", (("phase", p),)): float(p == "training") for p in (*PHASES, *ENDED)},
        ("fleetlora_devices_enrolled", ()): 3,
        ("fleetlora_devices_update_status", (("status", "applied"),)): 2,
        ("fleetlora_devices_update_status", (("status", "rejected"),)): 1,
        ("fleetlora_package_bytes", ()): 120,
        ("fleetlora_package_ratio", ()): 0.12,
        ("fleetlora_package_bytes_out", ()): 240,  # two devices applied v1, whose newest package is 120 B
        ("fleetlora_epsilon_spent_max", ()): 4.0,
        ("fleetlora_epsilon_spent_median", ()): 2.0,
        ("fleetlora_database_up", ()): 1,
        ("fleetlora_devices_online", ()): 2,
    }
    assert samples[("process_resident_memory_bytes", ())] > 0  # the process's CPU and memory too
    assert ("process_cpu_seconds_total", ()) in samples
    assert any(name == "python_info" for name, _ in samples)


def test_the_grafana_dashboard_asks_only_for_metrics_this_endpoint_serves(scrape: Callable[..., Samples]):
    served = {name for name, _ in scrape(online=lambda: 1)}
    dashboard = json.loads((REPO / "deploy" / "grafana-dashboard.json").read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    asked = {name for expr in expressions for name in re.findall(r"\b(?:fleetlora|process)_\w+", expr)}
    assert len(asked) > 15 and asked <= served, sorted(asked - served)


def test_drops_are_counted_by_reason_kind_without_numbers_or_details(sqlite_url: str, tmp_path: Path):
    storage = Storage.open(sqlite_url, "default")
    storage.versions.register_lineage("L", "default", {"name": "tiny"}, "b" * 64, BASE_BYTES)
    reasons = [
        "declined: below the floor (ε 8 > 4)",
        "declined: no record can afford ε 2.5",
        "delta norm 12.5 above the round's bound 3.1 (10 × median)",
        "delta norm 1e9 above the round's bound 3",
        *[f"kind {chr(97 + n)}: x" for n in range(12)],
        "[bold red]\x1b[2J",
    ]
    dropped = [{"node_id": str(n), "reason": r} for n, r in enumerate(reasons)] + [["not", "a", "dict"]]
    storage.ledgers.record_failed_round("L", 1, RoundReport(20, 0, dropped, 0, 1.0, error="no quorum"))
    host = CoordinatorHost(state_dir=tmp_path, database=sqlite_url, metrics_port=0)
    collector = metrics.FleetCollector(Storage.open(host.database_url, host.tenant))
    [family] = [f for f in collector.collect() if f.name == "fleetlora_last_round_devices_dropped"]
    counts = {s.labels["reason"]: s.value for s in family.samples}
    assert counts["declined"] == 2 and counts["delta norm # above the round's bound #"] == 2
    assert len(counts) == metrics.MAX_REASONS + 1 and sum(counts.values()) == len(dropped)
    assert counts["other"] == len(dropped) - sum(v for k, v in counts.items() if k != "other")
    assert reason_kind("[bold red]\x1b[2J") == "bold red #j" and reason_kind(": only detail") == "unknown"
    assert reason_kind("device kiosk-7 is in quarantine: release it") == "device kiosk-# is in quarantine"


@pytest.mark.parametrize("failing", ["raises", "not a number", "hangs"])
def test_a_failing_devices_online_count_leaves_it_out_and_the_scrape_answers(
    scrape: Callable[..., Samples], monkeypatch: pytest.MonkeyPatch, failing: str
):
    monkeypatch.setattr(metrics, "ONLINE_SECONDS", 0.3)

    def online() -> int:
        if failing == "raises":
            raise RuntimeError("the SuperLink is down")
        if failing == "hangs":
            time.sleep(5)
        return "many"  # type: ignore[return-value]

    started = time.monotonic()
    samples = scrape(online=online)
    assert time.monotonic() - started < 4, "a hanging count must not hold the scrape"
    assert ("fleetlora_devices_online", ()) not in samples
    assert samples[("fleetlora_rounds_total", (("state", "completed"),))] == 1
    assert samples[("fleetlora_database_up", ())] == 1


def test_a_database_that_cannot_be_read_is_database_up_0_not_a_failed_scrape(
    scrape: Callable[..., Samples], sqlite_url: str
):
    assert scrape()[("fleetlora_database_up", ())] == 1
    storage = Storage.open(sqlite_url)
    with storage.db.engine.begin() as connection:
        connection.execute(text("ALTER TABLE rounds RENAME TO rounds_elsewhere"))
    samples = scrape(path="/metrics/")
    assert samples[("fleetlora_database_up", ())] == 0
    assert not any(name.startswith("fleetlora_rounds") for name, _ in samples)
    assert samples[("process_resident_memory_bytes", ())] > 0


def test_an_empty_database_gives_zeros_and_no_invented_figures(tmp_path: Path):
    host = CoordinatorHost(state_dir=tmp_path, metrics_port=0)
    names = {f.name: f for f in metrics.FleetCollector(Storage.open(host.database_url)).collect()}
    assert [s.value for s in names["fleetlora_rounds"].samples] == [0, 0]
    assert names["fleetlora_round_latest"].samples[0].value == 0
    assert names["fleetlora_devices_enrolled"].samples[0].value == 0
    for absent in ("fleetlora_round_phase", "fleetlora_package_ratio", "fleetlora_epsilon_spent_max"):
        assert absent not in names


@pytest.mark.parametrize("port", [-1, 65536])
def test_a_metrics_port_out_of_range_is_a_clear_error(tmp_path: Path, port: int):
    with pytest.raises(ConfigError, match="metrics-port"):
        serve_metrics(CoordinatorHost(state_dir=tmp_path, metrics_port=port))


def test_a_metrics_port_in_use_is_a_clear_error(host: CoordinatorHost):
    first = serve_metrics(host)
    try:
        taken = CoordinatorHost(
            state_dir=host.state_dir, database=host.database, metrics_port=first.server_address[1]
        )
        with pytest.raises(ConfigError, match="in use"):
            serve_metrics(taken)
    finally:
        first.server_close()
