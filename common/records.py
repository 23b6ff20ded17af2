"""Names of the Flower record keys both sides use, kept in one place so they cannot drift.

A message from the coordinator carries one ArrayRecord (the global adapter) and one
ConfigRecord; a reply carries one ArrayRecord (the adapter delta) and one MetricRecord.
"""

from __future__ import annotations

from typing import Final

# Record names inside a Message's RecordDict.
ARRAYS: Final = "arrays"
CONFIG: Final = "config"
METRICS: Final = "metrics"

# Config keys sent by the coordinator.
ROUND: Final = "round"
VERSION: Final = "version"
BASE_MODEL_SHA256: Final = "base-model-sha256"
CONTRACT_VERSION: Final = "contract-version"

# Metric keys in a device's reply. Flower weights aggregated metrics by NUM_EXAMPLES.
NUM_EXAMPLES: Final = "num-examples"
TRAIN_LOSS: Final = "train_loss"
TRAIN_STEPS: Final = "train_steps"
TRAIN_SECONDS: Final = "train_seconds"

# Bumped whenever a message's shape changes; a device refuses a contract it does not know.
# 2: model.pooling, train.personal_head, train.restricted_softmax.
CONTRACT: Final = 2
