"""What the coordinator asks of a device in a round, as one object on both sides of the wire."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

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
                f"Coordinator speaks contract {contract!r}, this device {records.CONTRACT}: "
                "upgrade whichever side is older."
            )
        return cls(
            spec=from_config(ModelSpec, config, "model"),
            train=from_config(TrainSettings, config, "train"),
            round=_field(config, records.ROUND, int),
            version=_field(config, records.VERSION, int),
            base_sha256=_field(config, records.BASE_MODEL_SHA256, str),
            tenant=_field(config, records.TENANT, str, "default"),
            seal_uploads=_field(config, records.SEAL_UPLOADS, bool, False),
            upload_codec=_field(config, records.UPLOAD_CODEC, str, "fp32+zstd"),
        )


_V = TypeVar("_V", int, str, bool)


def _field(config: ConfigRecord, key: str, kind: type[_V], default: _V | None = None) -> _V:
    """``config[key]`` if it has exactly type ``kind``; ``default`` when absent and one is given."""
    value = config.get(key, default)
    if type(value) is not kind:
        raise ConfigError(f"Message field {key!r} must be {kind.__name__}, got {value!r}.")
    return value
