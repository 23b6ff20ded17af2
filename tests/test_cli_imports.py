"""Every ``fleetlora`` command starts fast (issue 15): starting the command line loads no heavy library.

torch, transformers/peft, Flower and SQLAlchemy take seconds to import, so each command imports what it
needs when it runs, and the listings' own paths (the coordinator's storage, a device's update slots) load
only what reading needs. ``benchmarks/cli_latency.py`` measures the times; these keep the imports out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "flwr", "sqlalchemy")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "200"},
        timeout=120,
        check=False,
    )


def _loaded_by(module: str) -> list[str]:
    """Which of HEAVY a fresh interpreter holds after importing ``module``."""
    done = _run(
        "-c", f"import json, sys, {module}; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_starting_the_command_line_imports_no_heavy_library():
    assert _loaded_by("fleetlora.cli") == []


@pytest.mark.parametrize(
    ("module", "allowed"),
    [
        ("fleetlora.coordinator.storage", {"sqlalchemy"}),  # versions/packages/devices/audit listings, status
        ("fleetlora.client.updates", set()),  # device status
        ("fleetlora.client.corpus.store", set()),  # device corpus list, quarantine list
        ("fleetlora.client.corpus.labels", set()),  # device review list
    ],
)
def test_what_the_listings_read_with_loads_no_model_library(module: str, allowed: set[str]):
    assert set(_loaded_by(module)) <= allowed


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        ([], ["Federated LoRA for edge fleets", "simulate", "coordinator", "device"]),
        (["coordinator"], ["Operate the coordinator", "versions", "packages", "status", "audit"]),
        (["device"], ["Set up and inspect the device agent.", "status", "corpus", "quarantine", "apply"]),
    ],
)
def test_help_answers_with_its_usual_text(words: list[str], expected: list[str]):
    done = _run("-m", "fleetlora", *words, "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Usage: " in done.stdout
    for text in expected:
        assert text in done.stdout
