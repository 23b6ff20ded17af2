"""What the coordinator asks of a device in a round, as one object on both sides of the wire."""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ConfigRecord

from fleetlora.common import records
from fleetlora.common.config import ModelSpec, TrainSettings, from_config, to_config
from fleetlora.common.errors import ConfigError


@dataclass(frozen=True)
class Instructions:
    """The model to build, how to train it, and which round and global version this is."""

    spec: ModelSpec
    train: TrainSettings
    round: int
    version: int
    base_sha256: str
    tenant: str = "default"  # the fleet this coordinator serves; bound into every sealed upload
    seal_uploads: bool = False  # reply with a delta encrypted to the coordinator and signed
    upload_codec: str = "fp32+zstd"  # how a sealed delta is encoded before encryption (common.codec)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                **to_config(self.spec, "model"),
                **to_config(self.train, "train"),
                records.ROUND: self.round,
                records.VERSION: self.version,
                records.BASE_MODEL_SHA256: self.base_sha256,
                records.TENANT: self.tenant,
                records.SEAL_UPLOADS: self.seal_uploads,
                records.UPLOAD_CODEC: self.upload_codec,
                records.CONTRACT_VERSION: records.CONTRACT,
            }
        )

    @classmethod
    def from_record(cls, config: ConfigRecord) -> Instructions:
        contract = config.get(records.CONTRACT_VERSION)
        if contract != records.CONTRACT:
            raise ConfigError(
                f"Coordinator speaks contract {contract}, this device {records.CONTRACT}: "
                "upgrade whichever side is older."
            )
        return cls(
            spec=from_config(ModelSpec, config, "model"),
            train=from_config(TrainSettings, config, "train"),
            round=int(config[records.ROUND]),
            version=int(config[records.VERSION]),
            base_sha256=str(config[records.BASE_MODEL_SHA256]),
            tenant=str(config.get(records.TENANT, "default")),
            seal_uploads=bool(config.get(records.SEAL_UPLOADS, False)),
            upload_codec=str(config.get(records.UPLOAD_CODEC, "fp32+zstd")),
        )
