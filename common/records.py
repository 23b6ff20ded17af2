"""Names of the Flower record keys both sides use, kept in one place so they cannot drift.

A message from the coordinator carries one ArrayRecord (the global adapter) and one
ConfigRecord; a train reply carries one ArrayRecord (the adapter delta), one MetricRecord and one
ConfigRecord (the device's id, and its reason when it declines to train).
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
TENANT: Final = "tenant"
SEAL_UPLOADS: Final = "seal-uploads"
UPLOAD_CODEC: Final = "upload-codec"

# Metric keys in a device's reply. Flower weights aggregated metrics by NUM_EXAMPLES.
NUM_EXAMPLES: Final = "num-examples"
TRAIN_LOSS: Final = "train_loss"
TRAIN_STEPS: Final = "train_steps"
TRAIN_SECONDS: Final = "train_seconds"
TRAIN_PAUSED_SECONDS: Final = "train_paused_seconds"  # of those, waiting for the device's gates to reopen
# A DP device's cumulative spend after the round (the coordinator's privacy ledger keeps them).
# Budgets are per record (client/privacy.py): dp_epsilon is the largest ε any of its records has spent.
DP_EPSILON: Final = "dp_epsilon"
DP_DELTA: Final = "dp_delta"
DP_NOISE_MULTIPLIER: Final = "dp_noise_multiplier"
DP_SAMPLE_RATE: Final = "dp_sample_rate"
DP_RECORDS_RETIRED: Final = "dp_records_retired"  # records whose ε is spent: they never train with DP again

# Config keys in a device's train reply: who it is, and why it declined to train (if it did).
DEVICE_ID: Final = "device-id"
DECLINED: Final = "declined"

# Sampling: "who are you?" (ClientApp query action); the reply's ConfigRecord holds DEVICE_ID. Sent once
# per node and run, so rounds sample by device id rather than by Flower's node id.
QUERY_IDENTITY: Final = "query.identity"

# Update distribution: message types (ClientApp query actions) and the config keys of their replies.
QUERY_UPDATE_STATUS: Final = "query.update_status"  # "which version do you hold?"
QUERY_UPDATE_APPLY: Final = "query.update_apply"  # carries a package (common.package.PACKAGE)
ACTIVE_VERSION: Final = "active-version"  # absent: the device holds no packaged adapter yet
ACTIVE_SEQUENCE: Final = "active-sequence"  # 0 before the first package
UPDATE_STATUS: Final = "update-status"  # "applied" | "rejected" | "failed"
UPDATE_REASON: Final = "update-reason"  # a PackageError reason code, or the error's text
WANTS_TRAIN: Final = "wants-train"  # a corpus device whose new records drifted from its last training set
DRIFT: Final = "drift"  # that drift, as distance ÷ chance; absent when infinite (before its first training)
# A device's gates (client/gates.py) and capability (client/accelerator.py), in its status replies.
ELIGIBLE: Final = "eligible"  # bool: every gate is open now, it would train if sampled
NOT_ELIGIBLE: Final = "not-eligible"  # why not: the closed gates' reasons (absent when eligible)
ACCELERATOR: Final = "accelerator"  # "cuda", "mps", "xpu" or "cpu": where it trains
MEMORY_BYTES: Final = "memory-bytes"  # the memory its training may use (its budget)

# Bumped whenever a message's shape changes; a device refuses a contract it does not know.
# 2: model.pooling, train.personal_head, train.restricted_softmax, train.privacy.*; replies carry
#    device-id (and declined) in a ConfigRecord, and dp_* metrics.
# 3: update packages (query.update_status, query.update_apply); sealed deltas encoded with upload-codec.
# 4: no -1 sentinels: a device with no packaged adapter leaves active-version out, one that never
#    trained leaves drift out.
# 5: train.forgetting.* (client/forgetting.py): a device that ignored them would train without the
#    forgetting control the coordinator asked for.
# 6: status replies carry eligible / not-eligible and the device's capability (accelerator,
#    memory-bytes); a device whose gates are closed declines a train message with the reason.
CONTRACT: Final = 6
