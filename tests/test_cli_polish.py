"""The command line as a new operator meets it: listings that fit 100 columns with every id whole,
``--json`` a script can rely on, ``--config`` wherever ``--db`` is, no database made by a read command,
and one-line errors that say what to do next (never a traceback).

Listings run in-process (typer's CliRunner, whose output is not a terminal, as a pipe's is); errors run
in a subprocess, where what matters is what the process prints and its exit status.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.cells import cell_len
from typer.testing import CliRunner

from fleetlora.cli import app
from fleetlora.client.corpus import labels
from fleetlora.client.corpus.cli import open_store
from fleetlora.client.corpus.pipeline import Pipeline
from fleetlora.client.corpus.records import Record, stamped
from fleetlora.common.config import ModelSpec
from fleetlora.common.model import build_model
from fleetlora.common.terminal import console
from fleetlora.coordinator.deploy_cli import status_view
from fleetlora.coordinator.packages import PackagePolicy, build_package
from fleetlora.coordinator.storage import Decline, NewVersion, StatusReport, Storage
from tests.client.update_harness import TENANT, make_fleet
from tests.conftest import POSTGRES_ADMIN_URL

REPO = Path(__file__).resolve().parents[1]
WIDTH = {"COLUMNS": "100"}
DEVICE = "kitchen-sensor-0001-with-a-long-name"
TEXTS = ["my card was declined at the shop", "how do I change my pin", "where is my refund"]


@pytest.fixture
def fleet_db(tmp_path: Path, tiny_spec: ModelSpec, db_url: str) -> Iterator[Path]:
    """A fleet database (versions v1-v4 with metrics on the last, four packages, an enrolled and a
    quarantined device) in tenant ``acme``, and a fleetlora.toml naming it; yields the config file."""
    fleet = make_fleet(tmp_path, tiny_spec, db_url)
    v0, v1, v2 = fleet.versions
    v3 = fleet.storage.versions.add(
        NewVersion(
            lineage=v2.lineage,
            parent_id=v2.id,
            round=3,
            base_model_sha256=v2.base_model_sha256,
            adapter=fleet.adapters[2],
            participants={"1234567890123": 40, "98765432109876": 33},
            metrics={"central_accuracy": 0.8123, "central_loss": 0.55, "federated_eval_accuracy": 0.7},
        )
    )
    for to, start in ((v1, v0), (v2, v1), (v2, None), (v3, v2)):
        build_package(fleet.storage, to.id, start.id if start else None, fleet.key, PackagePolicy())
    fleet.storage.devices.enroll(DEVICE, TENANT, fleet.public, None)
    fleet.storage.devices.flag(
        v2.lineage, 3, [(DEVICE, "delta norm far above the round's bound")], quarantine_after=1
    )
    fleet.storage.close()
    config = tmp_path / "fleetlora.toml"
    config.write_text(f'[coordinator]\nstate-dir = "state"\ndatabase = "{db_url}"\ntenant = "{TENANT}"\n')
    yield config


def invoke(*args: str, env: dict[str, str] | None = None) -> str:
    done = CliRunner().invoke(app, list(args), env=env or WIDTH)
    assert done.exit_code == 0, (done.output, done.exception)
    return done.output


def tables(output: str) -> list[tuple[list[str], list[list[str]]]]:
    """Each table printed: its header cells and its rows' cells (one list per printed line)."""
    found: list[tuple[list[str], list[list[str]]]] = []
    for line in output.splitlines():
        if line.startswith("┏"):
            found.append(([], []))
        elif line.startswith("┃") and not found[-1][1]:
            found[-1][0].append(line)
        elif line.startswith("│"):
            found[-1][1].append([cell.strip() for cell in line.strip("│").split("│")])
    return [([cell.strip() for cell in header[0].strip("┃").split("┃")], rows) for header, rows in found]


def assert_fits(output: str, width: int = 100) -> list[tuple[list[str], list[list[str]]]]:
    """Nothing wider than ``width``, and every row has as many values as its table has headers."""
    assert all(cell_len(line) <= width for line in output.splitlines()), output
    found = tables(output)
    assert found, output
    for headers, rows in found:
        assert all(len(row) == len(headers) for row in rows), (headers, rows)
    return found


def first_cells(rows: list[list[str]]) -> list[str]:
    return [row[0] for row in rows if row[0]]


# ---- listings fit 100 columns, ids whole ------------------------------------------------------------


def test_coordinator_listings_fit_100_columns_with_every_id_whole(fleet_db: Path):
    config = str(fleet_db)

    ((headers, rows),) = assert_fits(invoke("coordinator", "versions", "list", "--config", config))
    assert first_cells(rows) == ["v1", "v2", "v3", "v4"]
    metrics = " ".join(row[headers.index("test metrics")] for row in rows).split()
    assert metrics[-4:] == ["accuracy", "0.812,", "loss", "0.550"]  # wrapped, never cut

    ((headers, rows),) = assert_fits(invoke("coordinator", "packages", "list", "--config", config))
    assert first_cells(rows) == ["1", "2", "3", "4"]
    assert [row[1:3] for row in rows] == [["v1", "v2"], ["v2", "v3"], ["full", "v3"], ["v3", "v4"]]

    ((headers, rows),) = assert_fits(invoke("coordinator", "devices", "list", "--config", config))
    assert first_cells(rows) == [DEVICE]

    ((headers, rows),) = assert_fits(invoke("coordinator", "devices", "quarantined", "--config", config))
    assert first_cells(rows) == [DEVICE] and headers[:3] == ["device", "since", "why"]

    ((headers, rows),) = assert_fits(invoke("coordinator", "audit", "list", "--config", config))
    # the lineage, 4 versions, 4 packages, the enrolment and the quarantine: 11 changes, each numbered
    assert headers[:2] == ["#", "at"] and first_cells(rows) == [str(n) for n in range(1, 12)]


def test_a_pipe_honours_columns(fleet_db: Path):
    done = subprocess.run(
        [sys.executable, "-m", "fleetlora", "coordinator", "versions", "list", "--config", str(fleet_db)],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "COLUMNS": "72"},
        timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    ((headers, rows),) = assert_fits(done.stdout, 72)
    assert first_cells(rows) == ["v1", "v2", "v3", "v4"] and len(headers) < 10  # the least needed went


def test_status_shows_a_column_only_later_rows_have_and_formats_durations(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setenv("COLUMNS", "100")
    view = status_view(
        {
            "versions": [
                {"version": "v1", "round": 0},
                {"version": "v2", "round": 1, "federated_eval_accuracy": 0.7},
            ],
            "runs": [
                {
                    "run_id": 7,
                    "status": "finished:completed",
                    "elapsed_seconds": 52.738902,
                    "pending_at": "t",
                },
                {"run_id": 8, "status": "running", "elapsed_seconds": 192.0, "pending_at": "t"},
            ],
            "devices": [],
        }
    )
    console().print(view)
    (versions_headers, versions_rows), (runs_headers, runs_rows), (none_headers, _) = assert_fits(
        capsys.readouterr().out
    )
    assert versions_headers == ["version", "round", "federated eval accuracy"]
    assert versions_rows == [["v1", "0", "-"], ["v2", "1", "0.7"]]
    assert runs_headers == ["run id", "status", "elapsed", "pending at"]
    assert [row[2] for row in runs_rows] == ["52.7 s", "3 min 12 s"]
    assert none_headers == ["(none)"]


def test_status_json_has_snake_case_ascii_keys_and_an_unreachable_superlink_says_to_start_it(
    fleet_db: Path,
):
    output = invoke("coordinator", "status", "--config", str(fleet_db), "--json")
    report = json.loads(output)
    keys = {key for rows in report.values() for row in rows for key in row}
    assert keys >= {"device", "last_seen", "epsilon_spent", "version"} and all(k.isascii() for k in keys)
    assert all(k == k.lower() and " " not in k and "-" not in k for k in keys)
    (run,) = report["runs"]
    assert "fleetlora coordinator up --config" in run["error"]
    assert not (fleet_db.parent / "state" / "flwr").exists()  # no stray Flower home made on the way


def test_device_listings_fit_100_columns_with_every_record_id_whole(tmp_path: Path, tiny_spec: ModelSpec):
    state = tmp_path / "device"
    with open_store(state) as store:
        store.add_many(stamped(Record(text, "inbox:" + "a-long-file-name" * 3, "d")) for text in TEXTS)
        labels.propose(store, labels.Labeller(build_model(tiny_spec), "model:v3"), floor=0.99)  # all unsure
        Pipeline(store).quarantine(Record("[bold]hi[/]", "http", "d"), "too-short: under 3 words " * 3)
        held = {q.record.id for q in store.quarantined()}
        queued = {r.id for r in labels.review_queue(store)}
    for words, ids in (
        (["quarantine", "list"], held),
        (["review", "list"], queued),
        (["corpus", "list"], queued),
    ):
        ((headers, rows),) = assert_fits(invoke("device", *words, "--state-dir", str(state)))
        assert headers[0] == "id" and set(first_cells(rows)) == ids, (words, rows)
        documents = json.loads(invoke("device", *words, "--state-dir", str(state), "--json"))
        assert {d["id"] for d in documents} == ids and all(k.isascii() for d in documents for k in d)
    (review,) = json.loads(invoke("device", "review", "list", "--state-dir", str(state), "--json"))[:1]
    assert {"label", "confidence", "by"} <= set(review["proposals"][0])
    (held_record,) = json.loads(invoke("device", "quarantine", "list", "--state-dir", str(state), "--json"))
    assert held_record["text"] == "[bold]hi[/]" and held_record["reason"].startswith("too-short")


# ---- --json ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["versions", "list"], {"id", "label", "lineage", "parent_id", "round", "metrics", "participants"}),
        (["packages", "list"], {"id", "from_version", "to_version", "codec", "package_bytes", "ratio"}),
        (["devices", "list"], {"device_id", "tenant", "node_id", "enrolled_at"}),
        (["devices", "quarantined"], {"device_id", "reason", "quarantined_at", "last_flags"}),
        (["audit", "list"], {"seq", "at", "actor", "action", "subject", "details", "entry_hash"}),
    ],
)
def test_listings_print_json_lists_of_objects_with_ascii_keys(
    fleet_db: Path, words: list[str], expected: set
):
    documents = json.loads(invoke("coordinator", *words, "--config", str(fleet_db), "--json"))
    assert isinstance(documents, list) and documents
    assert all(isinstance(d, dict) and expected <= set(d) and all(k.isascii() for k in d) for d in documents)


# ---- --config wherever --db is; no database made by a read command ----------------------------------


def test_config_names_the_database_and_tenant_and_db_wins_over_it(fleet_db: Path, tmp_path: Path):
    listed = json.loads(invoke("coordinator", "versions", "list", "--config", str(fleet_db), "--json"))
    assert [v["label"] for v in listed] == ["v1", "v2", "v3", "v4"]
    other = f"sqlite:///{tmp_path / 'other.db'}"
    invoke("coordinator", "db", "upgrade", "--db", other)
    assert (
        json.loads(
            invoke("coordinator", "versions", "list", "--config", str(fleet_db), "--db", other, "--json")
        )
        == []
    )
    # --tenant wins over the config's too: another fleet's rows are not shown.
    assert (
        json.loads(
            invoke("coordinator", "versions", "list", "--config", str(fleet_db), "--tenant", "x", "--json")
        )
        == []
    )


def fleetlora(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetlora", *args],
        capture_output=True, text=True, cwd=cwd, env={**os.environ, **WIDTH},
        timeout=120, check=False,
    )  # fmt: skip


def error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The one line a user's mistake prints: exit status 2, no traceback, nothing else on stderr."""
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


@pytest.mark.parametrize("words", [["versions", "list"], ["packages", "list"], ["audit", "list"], ["status"]])
def test_a_read_command_refuses_a_missing_sqlite_database_and_makes_none(tmp_path: Path, words: list[str]):
    line = error_line(fleetlora("coordinator", *words, cwd=tmp_path))
    assert "No fleetlora database at sqlite:///" in line and "fleetlora.db" in line
    assert "--db" in line and "--config" in line and "fleetlora coordinator db upgrade" in line
    assert list(tmp_path.iterdir()) == []  # no fleetlora.db, no coordinator/ folder


def test_a_read_command_refuses_an_empty_database(tmp_path: Path):
    (tmp_path / "empty.db").touch()
    line = error_line(
        fleetlora("coordinator", "versions", "list", "--db", f"sqlite:///{tmp_path / 'empty.db'}")
    )
    assert "holds no fleetlora tables" in line


def test_a_missing_postgresql_database_or_server_is_one_line_naming_the_url():
    missing = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/fleetlora_no_such_database"
    for words in (["versions", "list"], ["db", "upgrade"]):
        line = error_line(fleetlora("coordinator", *words, "--db", missing))
        assert "fleetlora_no_such_database" in line and "does not exist" in line and "createdb" in line
    line = error_line(
        fleetlora("coordinator", "packages", "list", "--db", "postgresql+psycopg://postgres@127.0.0.1:1/x")
    )
    assert "127.0.0.1:1" in line and "that the server runs" in line


# ---- errors that name the problem and the next step -------------------------------------------------


def test_a_mistyped_federation_key_is_named(tmp_path: Path):
    config = tmp_path / "fleetlora.toml"
    config.write_text("[federation]\nroundz = 3\n")
    assert "'roundz'" in error_line(fleetlora("coordinator", "round", "start", "--config", str(config)))
    config.write_text("[federation]\nrounds = 0\n")
    assert "rounds: must be >= 1, got 0" in error_line(
        fleetlora("coordinator", "round", "start", "--config", str(config))
    )


def test_round_start_without_a_running_coordinator_says_to_start_it(fleet_db: Path):
    line = error_line(fleetlora("coordinator", "round", "start", "--config", str(fleet_db)))
    assert "fleetlora coordinator up --config" in line
    assert not (fleet_db.parent / "state" / "flwr").exists()


def test_device_apply_without_the_coordinators_key_names_the_option(tmp_path: Path):
    package = tmp_path / "v2.pkg"
    package.write_bytes(b"not yet read")
    line = error_line(fleetlora("device", "apply", str(package), "--state-dir", str(tmp_path / "device")))
    assert "--coordinator-key" in line and "coordinator-signing.pub" in line


def test_enrolment_hint_names_the_config_and_auth_key_enrolment_needs_it(tmp_path: Path):
    hint = invoke("device", "enroll", "--state-dir", str(tmp_path / "device"), "--device-id", "d1")
    assert "--auth-key supernode-auth.pub --config fleetlora.toml" in hint
    line = error_line(
        fleetlora(
            "coordinator", "devices", "enroll", "--device-id", "d1",
            "--public-key", str(tmp_path / "device" / "device-signing.pub"),
            "--auth-key", str(tmp_path / "device" / "supernode-auth.pub"), cwd=tmp_path,
        )
    )  # fmt: skip
    assert "--config FILE" in line
    assert not (tmp_path / "coordinator").exists()  # no stray ./coordinator/flwr


# ---- help shows brackets as written --------------------------------------------------------------


@pytest.mark.parametrize(
    ("words", "shown"),
    [
        (["device", "up"], "fleetlora.toml with a [device] section."),
        (["coordinator", "round", "start"], "Rounds to run [default: the config's]."),
        (["coordinator", "versions", "list"], "[default: the config's, else"),
        (["coordinator", "devices", "enroll"], "The fleet whose rows to see or change"),
    ],
)
def test_help_shows_bracketed_words(words: list[str], shown: str):
    help_text = " ".join(invoke(*words, "--help", env={"COLUMNS": "200"}).split())
    assert shown in help_text


def test_status_shows_the_round_in_progress_with_a_bar_and_in_json(fleet_db: Path, db_url: str):
    storage = Storage.open(db_url, TENANT)
    lineage = storage.versions.all()[-1].lineage
    storage.ledgers.enter_phase(lineage, 4, "sampling")
    training = storage.ledgers.enter_phase(lineage, 4, "training", total=5)
    storage.ledgers.advance_phase(training.id, 3)

    report = json.loads(invoke("coordinator", "status", "--config", str(fleet_db), "--json"))
    (current,) = report["current_round"]
    shown = invoke("coordinator", "status", "--config", str(fleet_db))

    assert (current["round"], current["phase"], current["done"], current["total"]) == (4, "training", 3, 5)
    assert shown.splitlines()[0].startswith("round 4 training") and "3/5" in shown.splitlines()[0]
    assert "━" in shown.splitlines()[0]  # the bar
    ((headers, rows), *_) = tables(shown)
    assert headers[:2] == ["round", "phase"] and rows[0][:4] == ["4", "training", "3", "5"]


def test_status_shows_each_devices_eligibility_capability_and_last_decline(fleet_db: Path, db_url: str):
    devices = Storage.open(db_url, TENANT).devices
    devices.enroll("phone-2", TENANT, Ed25519PrivateKey.generate().public_key())
    devices.enroll("phone-3", TENANT, Ed25519PrivateKey.generate().public_key())  # never reported
    for device, node in ((DEVICE, 101), ("phone-2", 102)):
        devices.record_update(device, tenant=TENANT, node_id=node, status="current", reason=None)
    devices.record_status_reports(
        {
            DEVICE: StatusReport(accelerator="cuda", memory_bytes=int(7.5 * 2**30)),
            "phone-2": StatusReport(accelerator="cpu", memory_bytes=768 * 2**20),
        }
    )
    devices.record_declines(5, [Decline(102, "phone-2", "on battery (34%)")])
    keys = ("eligible", "not_eligible", "accelerator", "memory_bytes", "last_decline")

    report = json.loads(invoke("coordinator", "status", "--config", str(fleet_db), "--json"))
    rows = {row["device"]: [row[k] for k in keys] for row in report["devices"]}
    wide = invoke("coordinator", "status", "--config", str(fleet_db), env={"COLUMNS": "200"})
    narrow = invoke("coordinator", "status", "--config", str(fleet_db))

    assert rows == {
        DEVICE: [True, None, "cuda", int(7.5 * 2**30), None],
        "phone-2": [
            False,
            "on battery (34%)",
            "cpu",
            768 * 2**20,
            {"round": 5, "reason": "on battery (34%)"},
        ],
        "phone-3": [None, None, None, None, None],
    }
    ((headers, shown),) = [(h, r) for h, r in tables(wide) if h[0] == "device"]
    columns = [
        headers.index(h) for h in ("device", "eligible", "why not", "runs on", "memory", "last decline")
    ]
    assert [[row[i] for i in columns] for row in shown] == [
        [DEVICE, "yes", "-", "cuda", "7.5 GiB", "-"],
        ["phone-2", "no", "on battery (34%)", "cpu", "768 MiB", "r5: on battery (34%)"],
        ["phone-3", "-", "-", "-", "-", "-"],
    ]
    ((headers, _),) = [(h, r) for h, r in assert_fits(narrow) if h[0] == "device"]
    assert {"eligible", "why not"} <= set(headers)  # kept at 100 columns; capability goes first
