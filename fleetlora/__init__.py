"""fleetlora: federated LoRA for edge fleets.

Importing any part of fleetlora pins the process to offline, quiet operation: models come from
packages on disk (never a hub), and Flower sends no telemetry.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # CPU-only: silence Ray's GPU tip

__version__ = "0.1.0"
