"""results.json: how a simulation writes down each round it ran."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from fleetlora.coordinator.rounds import RoundOutcome

SIMULATED_DEVICE = re.compile(r"partition-(\d+)")  # a simulated device's id (client_app.device_id)


def summarize(outcome: RoundOutcome) -> dict[str, Any]:
    """The round as a plain dict: one entry of results.json's ``rounds``.

    ``partitions`` lists the sampled devices in the order drawn, so two runs (or two arms) can be
    checked to have trained the same schedule.
    """
    return {
        "round": outcome.round,
        "version": outcome.version.label if outcome.version else None,
        "partitions": [partition_of(device) for device in outcome.sampled_devices],
        "participants": len(outcome.participants),
        "examples": outcome.examples,
        "dropped": [d.as_dict() for d in outcome.drops],
        "metrics": outcome.metrics,
        "upload_bytes": outcome.upload_bytes,
        "seconds": round(outcome.seconds, 3),
        **({"error": outcome.error} if outcome.error else {}),
        **({"privacy": {s.device_id: s.epsilon for s in outcome.privacy}} if outcome.privacy else {}),
        **(
            {
                "package_bytes": outcome.package.package_bytes,
                "package_ratio": round(outcome.package.ratio, 6),
                "package_codec": outcome.package.codec,
            }
            if outcome.package
            else {}
        ),
        **({"updates": outcome.distribution.as_dict()} if outcome.distribution else {}),
        **({"package_error": outcome.package_error} if outcome.package_error else {}),
        **({"quarantined": outcome.quarantined} if outcome.quarantined else {}),
        **({"held": outcome.held} if outcome.held else {}),  # the retention gate's reason
    }


def partition_of(device_id: str) -> int | str:
    """A simulated device's partition number; any other device by its id."""
    match = SIMULATED_DEVICE.fullmatch(device_id)
    return int(match[1]) if match else device_id


def with_earlier_rounds(path: Path, results: dict[str, Any]) -> dict[str, Any]:
    """``results`` of a run that resumed a lineage, with the rounds an earlier run wrote to ``path``.

    A simulation re-run into the same ``--out`` resumes from the latest stored version; its results
    keep every round of the lineage, the earlier run's first (its ``initial`` too), then this run's.
    A file of another lineage, or one that does not parse, is left out: this run's results stand alone.
    """
    if not results["initial"]["resumed"] or not path.is_file():
        return results
    try:
        earlier = json.loads(path.read_text())
        same = isinstance(earlier, dict) and earlier.get("lineage") == results["lineage"]
        rounds = [r for r in earlier["rounds"] if r["round"] <= results["initial"]["round"]] if same else []
        devices = dict(earlier["devices"]) if same else {}
        initial = earlier["initial"] if same else results["initial"]
    except (ValueError, KeyError, TypeError):
        return results
    return {
        **results,
        "initial": initial,
        "rounds": [*rounds, *results["rounds"]],
        "devices": {**devices, **results["devices"]},
    }
