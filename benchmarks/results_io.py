"""What the benchmark scripts share at the end of ``main()``: the machine they ran on, the load on it, the
default result file and writing the result out (a JSON file, and the one-line JSON as stdout's last line,
which the smoke tests compare with what ``main`` returns).

Not a benchmark: it has no ``main``, so ``run_all.py`` does not run it. The scripts are run by path, which
puts this folder on ``sys.path``; ``tests/benchmarks/conftest.py`` puts it there for the smoke tests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """``machine``'s common keys: the cores and the threads torch uses (torch is imported only here,
    so a script that does not train does not pay for it before it has to)."""
    import torch

    return {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def load_average() -> float:
    """The 1-minute load average now, to 2 decimals (other work on the machine skews the figures)."""
    return round(os.getloadavg()[0], 2)


def load_before_after(before: float) -> dict[str, float]:
    """``load_average``: ``before`` (taken at the start) and the 1-minute load now."""
    return {"before": round(before, 2), "after": load_average()}


def default_path(name: str, quick: bool, folder: Path = RESULTS) -> Path:
    """``folder/NAME.json``, or ``folder/quick/NAME.json`` for a quick run."""
    return folder / ("quick" if quick else "") / f"{name}.json"


def write_json(result: dict[str, Any], path: Path) -> None:
    """``result`` as indented JSON with a final newline, its folder created if need be."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def emit(result: dict[str, Any], path: Path | None = None) -> None:
    """Write ``result`` to ``path`` (if given), then print it as one line of JSON: stdout's last line."""
    if path is not None:
        write_json(result, path)
    print(json.dumps(result), flush=True)
