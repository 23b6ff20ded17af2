"""Where a device's examples come from.

A real device names its file in its Flower node config (``data-path``), or ``corpus`` for the texts
its corpus store holds (``fleetlora device ingest``, :mod:`fleetlora.client.corpus`). A simulated device is
told only its ``partition-id`` by the Simulation Engine and computes its share of the run's
``data`` with the run's ``partition`` scheme and ``seed`` — the same pure function on every
device, so nothing is shipped around.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fleetlora.client.corpus.store import CORPUS_FILE, CorpusStore
from fleetlora.client.device_state import DeviceState, UserConfig
from fleetlora.common.data import Example, load_examples
from fleetlora.common.data.partition import PartitionScheme, partition_indices
from fleetlora.common.errors import DataError

CORPUS = "corpus"  # data-path value: train on the device's corpus store


def local_examples(node_config: UserConfig, run_config: UserConfig) -> list[Example]:
    """This device's examples; raises :class:`DataError` when it has none configured."""
    if "data-path" in node_config:
        source = str(node_config["data-path"])
        if source == CORPUS:
            return corpus_examples(DeviceState.locate(node_config, run_config).root / CORPUS_FILE)
        return load_examples(source)
    if "partition-id" in node_config:
        missing = [k for k in ("data", "partition", "seed") if k not in run_config]
        if missing:
            raise DataError(f"Simulated device: the run config lacks {missing}; set them in the run config.")
        parts = _partitions(
            str(run_config["data"]),
            str(run_config["partition"]),
            int(run_config["seed"]),
            int(node_config["num-partitions"]),
        )
        return list(parts[int(node_config["partition-id"])])
    raise DataError("This device has no data: start the SuperNode with --node-config 'data-path=\"FILE\"'.")


def corpus_examples(path: Path) -> list[Example]:
    """The texts in the device's corpus store: its current window, hot and cold tiers (the cold tier is
    the replay of older data), newest first."""
    if not path.is_file():
        raise DataError(f"No corpus at {path} yet: take records in with `fleetlora device ingest`.")
    with CorpusStore(path) as store:
        return [Example(r.text, r.label) for r in store.window() if r.modality == "text"]


@lru_cache(maxsize=2)
def _partitions(source: str, scheme: str, seed: int, num_parts: int) -> tuple[tuple[Example, ...], ...]:
    # Cached per process: one simulation worker serves many virtual devices of the same run.
    examples = load_examples(source)
    indices = partition_indices([e.label for e in examples], num_parts, PartitionScheme.parse(scheme), seed)
    return tuple(tuple(examples[i] for i in part) for part in indices)
