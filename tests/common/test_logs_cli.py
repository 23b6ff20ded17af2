"""``fleetlora coordinator logs search`` and ``fleetlora device logs search`` through the real CLI.

The logs are written by :func:`configure_json_logging` into the folders the host config names; what
comes out is a table (hostile text shown, never obeyed) or JSON lines; a bad ``--since`` or a missing
log folder is one line on stderr and exit status 2.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fleetlora.cli import app
from fleetlora.common.host_config import load_host_config
from fleetlora.common.logs import LOGGER, ConsoleHandler, JsonLinesHandler, configure_json_logging

REPO = Path(__file__).resolve().parents[2]
NOW = datetime.now(UTC)
HOSTILE = "[bold red]owned[/] \x1b]0;title\x07"


@pytest.fixture
def config(tmp_path: Path) -> Iterator[Path]:
    """A host config whose coordinator and device logs hold a few entries, recent and 3 days old."""
    path = tmp_path / "fleetlora.toml"
    path.write_text('[coordinator]\nstate-dir = "coordinator"\n\n[device]\nstate-dir = "device"\n')
    settings = load_host_config(path)
    configure_json_logging(settings.coordinator.log_dir, "coordinator")
    emit(NOW - timedelta(days=3), "SuperLink ready on 127.0.0.1:9092", event="superlink_ready")
    emit(NOW - timedelta(minutes=5), "round 7 completed", event="round_phase", round=7, version="v7")
    emit(NOW - timedelta(minutes=4), "package refused", device="kiosk-7", reason=HOSTILE)
    configure_json_logging(settings.device.log_dir, "client-app")
    emit(NOW - timedelta(minutes=3), "Trained round 7 on 40 examples", device="kiosk-7", version="v6")
    yield path
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        if isinstance(handler, JsonLinesHandler | ConsoleHandler):
            logger.removeHandler(handler)
            handler.close()


def emit(at: datetime, message: str, **extra: object) -> None:
    logger = logging.getLogger("fleetlora.test")
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, message, (), None, extra=extra)
    record.created = at.timestamp()
    logger.handle(record)


def run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def test_the_table_shows_time_component_level_message_and_fields(config: Path):
    output = run("coordinator", "logs", "search", "V7", "--config", str(config))
    assert "round 7 completed" in output and "event=round_phase round=7 version=v7" in output
    assert "SuperLink ready" not in output and "Trained" not in output  # the device's logs are its own
    assert (NOW - timedelta(minutes=5)).strftime("%Y-%m-%d %H:%M:%S") in output
    assert "coordinator" in output and "INFO" in output


def test_hostile_text_is_shown_not_obeyed(config: Path):
    output = run("coordinator", "logs", "search", "refused", "--config", str(config))
    assert "[bold red]owned[/]" in output  # Rich markup printed as text
    assert "\x1b" not in output and "\x07" not in output and "\\x1b" in output


def test_json_lines_carry_every_field_and_the_filters_apply(config: Path):
    output = run("coordinator", "logs", "search", "--since", "1h", "--device", "kiosk-7", "--json",
                 "--config", str(config))  # fmt: skip
    [entry] = [json.loads(line) for line in output.splitlines()]
    assert entry["message"] == "package refused" and entry["reason"] == HOSTILE
    assert entry["component"] == "coordinator" and entry["logger"] == "fleetlora.test"
    everything = run("coordinator", "logs", "search", "--json", "--config", str(config)).splitlines()
    assert [json.loads(line)["message"] for line in everything] == [
        "SuperLink ready on 127.0.0.1:9092",
        "round 7 completed",
        "package refused",
    ]
    assert run("coordinator", "logs", "search", "nothing like this", "--config", str(config)).strip() == (
        "no log entries match"
    )


def test_the_device_searches_its_own_logs(config: Path):
    output = run("device", "logs", "search", "v6", "--json", "--config", str(config))
    [entry] = [json.loads(line) for line in output.splitlines()]
    assert entry["message"] == "Trained round 7 on 40 examples" and entry["component"] == "client-app"
    table = run("device", "logs", "search", "--since", "2026-01-01T00:00", "--config", str(config))
    assert "Trained round 7 on 40 examples" in table and "device=kiosk-7" in table


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["coordinator", "logs", "search", "v7", "--since", "yesterday"], "--since 'yesterday'"),
        (["device", "logs", "search", "--since", "3w"], "--since '3w'"),
        (["coordinator", "logs", "search", "v7", "--config", "elsewhere.toml"], "No config file"),
    ],
)
def test_a_bad_since_or_config_is_one_line_and_exit_2(config: Path, args: list[str], problem: str):
    if "--config" not in args:
        args = [*args, "--config", str(config)]
    done = subprocess.run(
        [sys.executable, "-m", "fleetlora", *args],
        capture_output=True,
        text=True,
        cwd=config.parent,
        env={**os.environ, "COLUMNS": "200"},
        timeout=120,
    )
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error:") and problem in line


def test_a_host_with_no_logs_yet_says_so_in_one_line(tmp_path: Path):
    config = tmp_path / "fleetlora.toml"
    config.write_text('[coordinator]\nstate-dir = "fresh"\n')
    done = subprocess.run(
        [sys.executable, "-m", "fleetlora", "coordinator", "logs", "search", "x", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "No log folder" in done.stderr
