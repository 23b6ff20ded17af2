"""``fleetlora report``: plots and one page that compare runs, from results.json files a researcher hands it.

The runs are written here in the shape ``summarize`` (simulations/results.py) and ``simulate``
(simulations/runner.py) give them: a failed round, DP in one run and not the other, packages and their
distribution, dropped devices. The command runs in-process through typer's CliRunner; its errors run in
a subprocess, where the exit status and the one line on stderr are what a user sees.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

from fleetlora.cli import app
from fleetlora.common.errors import DataError
from fleetlora.simulations.run_report import config_differences
from fleetlora.simulations.run_results import bytes_down, load_run, read_results

REPO = Path(__file__).resolve().parents[2]
INJECTED = "<script>alert(1)</script>"


def _round(number: int, *, accuracy: float | None, epsilon: float | None, devices: int = 4) -> dict[str, Any]:
    """One entry of results.json's rounds, as ``summarize`` writes it; accuracy None: a failed round."""
    failed = accuracy is None
    entry: dict[str, Any] = {
        "round": number,
        "version": None if failed else f"v{number + 1}",
        "partitions": list(range(devices)),
        "participants": 0 if failed else devices - 1,
        "examples": 0 if failed else 120 * (devices - 1),
        "dropped": [{"node_id": str(9000 + number), "reason": "timed out"}]
        if not failed
        else [{"node_id": str(9000 + n), "reason": "no answer"} for n in range(devices)],
        "metrics": {} if failed else {"central_accuracy": accuracy, "central_loss": 2.0 - accuracy},
        "upload_bytes": 0 if failed else 350_000 * (devices - 1),
        "seconds": 1.5,
    }
    if failed:
        entry["error"] = "quorum: 0 of 4 devices answered"
        return entry
    if epsilon is not None:
        entry["privacy"] = {f"partition-{d}": epsilon - 0.1 * d for d in range(devices)}
    entry.update(package_bytes=90_000, package_ratio=0.0421, package_codec="zstd")
    entry["updates"] = {
        "version": f"v{number + 1}",
        "devices": {"applied": devices - 1, "no-answer": 1},
        "packages": {f"v{number}": {"codec": "zstd", "bytes": 90_000, "ratio": 0.0421}},
        "seconds": 0.2,
    }
    return entry


def _results(out: Path, rounds: list[dict[str, Any]], run_config: dict[str, Any], **extra: Any) -> dict:
    """A whole results.json, as ``simulate`` writes it."""
    return {
        "config": {
            "devices": 4,
            "out": str(out),
            "client_cpus": 2,
            "settings": {},
            "run_config": {
                "model": "tiny",
                "task": "auto",
                "rounds": len(rounds),
                "db": f"sqlite:///{out}/fleetlora.db",
                "keys": f"{out}/keys",
                "device-state": f"{out}/devices",
                **run_config,
            },
        },
        "base_model_bytes": 2_000_000,
        "trainable_share": 0.02,
        "lineage": "5f0c",
        "initial": {"version": "v1", "round": 0, "resumed": False, "metrics": {"central_accuracy": 0.1}},
        "rounds": rounds,
        **extra,
    }


@pytest.fixture
def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    """``dp8``: DP at ε 8, round 2 failed; ``nodp``: no DP, a setting with a script in it."""
    dp, nodp = tmp_path / "dp8", tmp_path / "nodp"
    dp_rounds = [
        _round(1, accuracy=0.41, epsilon=3.2),
        _round(2, accuracy=None, epsilon=None),
        _round(3, accuracy=0.6734, epsilon=6.5),
    ]
    nodp_rounds = [_round(n, accuracy=a, epsilon=None) for n, a in ((1, 0.52), (2, 0.7), (3, 0.8125))]
    devices = {f"partition-{d}": {"epsilon": 6.5 - 0.1 * d, "delta": 1e-5} for d in range(4)}
    memory = {"process_peak_mb": 900.0, "tree_peak_mb": 2345.6, "processes_at_peak": 6, "samples": 40}
    for folder, results in (
        (dp, _results(dp, dp_rounds, {"dp-epsilon": 8.0}, devices=devices, memory=memory)),
        (nodp, _results(nodp, nodp_rounds, {"dp-epsilon": 0.0, "labels": INJECTED}, devices={})),
    ):
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps(results, indent=2))
    return dp, nodp


def fleetlora(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetlora", *args],
        capture_output=True, text=True, cwd=cwd, env={**os.environ, "COLUMNS": "200"},
        timeout=120, check=False,
    )  # fmt: skip


def error_line(done: subprocess.CompletedProcess[str]) -> str:
    """What a user's mistake prints: exit status 2, one ``error:`` line, no traceback."""
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def test_two_runs_make_valid_plots_and_one_page(two_runs: tuple[Path, Path], tmp_path: Path):
    dp, nodp = two_runs
    out = tmp_path / "compare"
    done = CliRunner().invoke(app, ["report", str(dp), str(nodp), "--out", str(out)], env={"COLUMNS": "200"})
    assert done.exit_code == 0, (done.output, done.exception)
    assert f"report: {out / 'report.html'} (5 plots beside it)" in done.output

    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["accuracy.png", "bytes.png", "devices.png", "epsilon.png", "package_ratio.png"]
    for name in pngs:
        path = out / name
        with Image.open(path) as image:
            image.verify()  # a whole, readable PNG
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 200 and image.height > 200, name
        assert path.stat().st_size > 10_000, name

    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 5  # self-contained
    assert "dp8" in page and "nodp" in page
    # The summary: final accuracy (the failed round does not end dp8's line), ε, failures, bytes, memory.
    assert "<td>67.3%</td>" in page and "<td>81.2%</td>" in page
    assert "<td>6.50</td>" in page and "<td>no DP</td>" in page
    assert "<td>2345 MiB</td>" in page or "<td>2346 MiB</td>" in page
    assert "<td>0.0421</td>" in page  # mean package ratio
    assert "<td>2.0 MiB</td>" in page  # up: 2 rounds × 3 devices × 350 000 B
    assert "<td>527.3 KiB</td>" in page  # down: 2 rounds × 3 devices × 90 000 B
    rows = page.split("<tbody>")[1].split("</tbody>")[0].split("<tr>")[1:]
    assert "<td>1</td>" in rows[0] and rows[0].count("<td>3</td>") == 1  # dp8: 3 rounds, 1 failed
    # The configuration differences: the settings that differ, not the paths under each run's folder.
    differences = page.split("configuration differences")[1]
    assert "<td>dp-epsilon</td><td>8.0</td><td>0.0</td>" in differences
    assert "<td>labels</td>" in differences and "<td>model</td>" not in differences
    assert "<td>db</td>" not in differences
    # A setting is the user's text: escaped, never markup.
    assert INJECTED not in page and html_escaped(INJECTED) in page


def html_escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def test_one_run_reports_into_its_folder_with_every_setting(two_runs: tuple[Path, Path]):
    _, nodp = two_runs
    done = CliRunner().invoke(app, ["report", str(nodp)], env={"COLUMNS": "200"})
    assert done.exit_code == 0, (done.output, done.exception)
    assert (nodp / "report.html").is_file()
    assert not (nodp / "epsilon.png").exists()  # no run used DP: no ε plot
    assert "(4 plots beside it)" in done.output
    page = (nodp / "report.html").read_text()
    assert "<td>model</td><td>tiny</td>" in page and "<td>rounds</td><td>3</td>" in page


def test_identical_settings_say_so(two_runs: tuple[Path, Path], tmp_path: Path):
    _, nodp = two_runs
    twin = tmp_path / "twin"
    twin.mkdir()
    results = json.loads((nodp / "results.json").read_text())
    results["config"]["run_config"]["db"] = f"sqlite:///{twin}/fleetlora.db"  # a path: not a difference
    (twin / "results.json").write_text(json.dumps(results))
    assert config_differences([load_run(nodp), load_run(twin)]) == []
    done = CliRunner().invoke(app, ["report", str(nodp), str(twin), "--out", str(tmp_path / "r")])
    assert done.exit_code == 0, (done.output, done.exception)
    assert "<p>identical" in (tmp_path / "r" / "report.html").read_text()


def test_a_causal_lm_run_is_scored_by_perplexity(tmp_path: Path):
    run = tmp_path / "shakespeare"
    run.mkdir()
    rounds = [_round(n, accuracy=0.5, epsilon=None) for n in (1, 2)]
    for n, entry in enumerate(rounds):
        entry["metrics"] = {"central_loss": 3.0, "central_perplexity": 30.0 - n}
    (run / "results.json").write_text(json.dumps(_results(run, rounds, {"task": "causal-lm"})))
    done = CliRunner().invoke(app, ["report", str(run)])
    assert done.exit_code == 0, (done.output, done.exception)
    assert (run / "perplexity.png").is_file() and not (run / "accuracy.png").exists()
    assert "<td>29.00</td>" in (run / "report.html").read_text()


def test_a_missing_results_json_is_one_error_line(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    line = error_line(fleetlora("report", "empty", cwd=tmp_path))
    assert "results.json does not exist" in line and "fleetlora simulate --out" in line
    assert not (tmp_path / "report").exists()


def test_a_corrupt_results_json_is_one_error_line(two_runs: tuple[Path, Path], tmp_path: Path):
    dp, nodp = two_runs
    (nodp / "results.json").write_text('{"config": {"run_config": {}}, "rounds": [')
    line = error_line(fleetlora("report", str(dp), str(nodp), cwd=tmp_path))
    assert str(nodp / "results.json") in line and "is not JSON" in line
    assert not (tmp_path / "report").exists()  # every run is read before anything is written


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("[1, 2]", "holds no JSON object"),
        ('{"rounds": []}', "no config.run_config"),
        ('{"config": {"run_config": {}}}', "no list of rounds"),
        ('{"config": {"run_config": {}}, "rounds": [{"version": "v2"}]}', "rounds[0] has no round number"),
        (b"\xff\xfe\x00garbage", "is not JSON"),
        ("[" * 200_000, "is not JSON"),  # nested past the parser's recursion limit
    ],
)
def test_a_file_of_another_shape_is_refused(tmp_path: Path, content: str | bytes, says: str):
    path = tmp_path / "results.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=r".*") as raised:
        load_run(tmp_path)
    assert says in str(raised.value) and "\n" not in str(raised.value)


def test_an_oversized_file_is_refused_before_it_is_read(tmp_path: Path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"rounds": [], "padding": "x" * 3000}))
    with pytest.raises(DataError, match="larger than"):
        read_results(path, limit=2048)


def test_values_of_the_wrong_type_are_gaps_not_crashes(two_runs: tuple[Path, Path], tmp_path: Path):
    dp, _ = two_runs
    results = json.loads((dp / "results.json").read_text())
    results["rounds"][0].update(participants="many", upload_bytes=None, metrics={"central_accuracy": "high"})
    results["rounds"][2]["updates"] = {"devices": "all", "packages": []}
    results["memory"] = "lots"
    (dp / "results.json").write_text(json.dumps(results))
    done = CliRunner().invoke(app, ["report", str(dp)])
    assert done.exit_code == 0, (done.output, done.exception)
    assert (dp / "report.html").is_file()


def test_bytes_down_counts_the_devices_that_applied_the_package():
    updates = {
        "devices": {"applied": 3, "current": 1},
        "packages": {"v1": {"bytes": 100}, "full": {"bytes": 300}},
    }
    assert bytes_down(updates) == 3 * 200  # which device got which package is not recorded: the mean
    assert bytes_down(None) is None
    assert bytes_down({"devices": {"applied": 2}, "packages": {}}) == 0.0


def test_simulate_takes_report():
    done = CliRunner().invoke(app, ["simulate", "--help"], env={"COLUMNS": "200"})
    assert done.exit_code == 0 and "--report" in done.output


def test_a_participant_s_failed_evaluation_is_not_counted_as_a_dropped_device(tmp_path: Path):
    from fleetlora.simulations.run_results import parse_round

    entry = _round(2, accuracy=0.5, epsilon=None)
    entry["dropped"].append({"node_id": "9100", "reason": "evaluation: declined: no held-out examples"})
    assert parse_round(entry, 0, tmp_path / "results.json").dropped == 1
