"""``fleetlora.toml``: one file for a deployed coordinator host and its devices.

``[coordinator]`` says where the SuperLink listens, where its state lives and which database to use;
``[federation]`` holds the run config a round starts with (the keys of ``[tool.flwr.app.config]``);
``[device]`` says where a device's SuperNode connects and what it keeps. Every setting has a
default, so a file may name only what differs (docs/operator.md lists them all).
Relative paths are taken from the folder of the file.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetlora.common.device_settings import DeviceSettings
from fleetlora.common.errors import ConfigError
from fleetlora.common.run_config import RunConfig

DEFAULT_PORT = 9092


@dataclass(frozen=True)
class CoordinatorHost:
    """The coordinator host: the SuperLink's address and the folders and database it keeps."""

    host: str = "127.0.0.1"  # the SuperLink's listening address (0.0.0.0: all interfaces)
    port: int = DEFAULT_PORT  # one HTTPS port: devices, operators and the ServerApp all use it
    state_dir: Path = Path("coordinator")  # keys/, certs/, superlink.db, flwr/ (Flower's home)
    database: str = ""  # SQLAlchemy URL of fleetlora's database; "" = SQLite in state_dir
    tenant: str = "default"
    tls_hosts: tuple[str, ...] = ("localhost", "127.0.0.1")  # names devices dial, put in the certificate
    # TLS 1.3 only on `port` (coordinator/tls_terminator.py): the SuperLink moves to 127.0.0.1:internal-port.
    tls_terminator: bool = True
    internal_port: int = 0  # the SuperLink's loopback port behind the terminator; 0 = port + 1
    console_host: str = "127.0.0.1"  # the operators' read-only web console (coordinator/console.py)
    console_port: int = 8470  # its port; 0 = no console
    metrics_host: str = "127.0.0.1"  # Prometheus scrapes /metrics here (coordinator/metrics.py)
    metrics_port: int = 9464  # its port; 0 = no metrics endpoint

    @property
    def keys_dir(self) -> Path:
        return self.state_dir / "keys"

    @property
    def certs_dir(self) -> Path:
        return self.state_dir / "certs"

    @property
    def flwr_home(self) -> Path:
        return self.state_dir / "flwr"

    @property
    def log_dir(self) -> Path:
        """JSON-lines logs, rotated daily (common/logs.py): `coordinator logs search` reads them."""
        return self.state_dir / "logs"

    @property
    def superlink_db(self) -> Path:
        return self.state_dir / "superlink.db"

    @property
    def database_url(self) -> str:
        return self.database or f"sqlite:///{(self.state_dir / 'fleetlora.db').resolve()}"

    @property
    def address(self) -> str:
        """Where local clients (the operator CLI, the ServerApp runner) reach the SuperLink."""
        return f"{'127.0.0.1' if self.host in ('0.0.0.0', '') else self.host}:{self.port}"

    @property
    def superlink_bind(self) -> tuple[str, int]:
        """Where flower-superlink itself listens: loopback behind the terminator, else the public port."""
        if self.tls_terminator:
            return "127.0.0.1", self.internal_port or self.port + 1
        return self.host, self.port


@dataclass(frozen=True)
class DeviceHost:
    """One device: which coordinator it joins, its identity, its folders and its data."""

    coordinator: str = f"127.0.0.1:{DEFAULT_PORT}"  # HOST:PORT of the SuperLink
    device_id: str = "device-1"
    state_dir: Path = Path("device")  # keys, privacy account, personal head, update slots
    ca_cert: Path = Path("ca.crt")  # the coordinator's CA certificate (`coordinator certs init`)
    coordinator_keys: Path = Path("coordinator-keys")  # coordinator-hpke.pub, coordinator-signing.pub
    data: str = "builtin"  # the device's local text (CSV/JSONL/TXT, or `builtin`)
    upload_consent: bool = False  # nothing leaves the device until its owner says so
    # The owner's privacy floor: the largest ε per record it ever spends (finite: DP required) and δ.
    dp_max_epsilon: float = math.inf
    dp_max_delta: float = 1e-5
    runtime_port: int = 9094  # the SuperNode's local port for its ClientApp (one per device on a host)
    warm_clientapp: bool = True  # import the ClientApp once and fork per message (client/warm_clientapp.py)
    # Accelerator, memory, priority and gates: in the same [device] table (common/device_settings.py).
    settings: DeviceSettings = field(default_factory=DeviceSettings)

    @property
    def auth_key(self) -> Path:
        return self.state_dir / "supernode-auth.key"

    @property
    def log_dir(self) -> Path:
        """JSON-lines logs of `device up` and its ClientApp: `device logs search` reads them."""
        return self.state_dir / "logs"


@dataclass(frozen=True)
class HostConfig:
    coordinator: CoordinatorHost = field(default_factory=CoordinatorHost)
    federation: dict[str, Any] = field(default_factory=dict)  # run config overrides for `round start`
    device: DeviceHost = field(default_factory=DeviceHost)


def load_host_config(path: Path | None) -> HostConfig:
    """Read ``path`` (None: all defaults, paths relative to the working folder)."""
    if path is None:
        return HostConfig()
    if not path.is_file():
        raise ConfigError(f"No config file at {path}: write one (docs/operator.md shows every setting).")
    try:
        document = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    unknown = set(document) - {"coordinator", "federation", "device"}
    if unknown:
        raise ConfigError(
            f"{path}: unknown section(s) {sorted(unknown)}; use coordinator, federation, device."
        )
    base = path.resolve().parent
    federation = document.get("federation", {})
    try:  # checked here, where the file is named, rather than later on the SuperLink
        RunConfig.from_mapping(federation)
    except ConfigError as exc:
        raise ConfigError(f"{path} [federation]: {exc}") from None
    return HostConfig(
        coordinator=_section(CoordinatorHost, document.get("coordinator", {}), path, base),
        federation=dict(federation),
        device=_device_section(document.get("device", {}), path, base),
    )


def _device_section(values: dict[str, Any], path: Path, base: Path) -> DeviceHost:
    """``[device]``: its own settings and, in the same table, the :class:`DeviceSettings` ones."""
    names = {f.name.replace("_", "-") for f in dataclasses.fields(DeviceSettings)}
    own = {k: v for k, v in values.items() if k not in names}
    try:
        settings = _section(DeviceSettings, {k: v for k, v in values.items() if k in names}, path, base)
    except ConfigError as exc:
        raise ConfigError(f"{path} [device]: {exc}") from None
    if settings.sensors.startswith("file:"):  # a path like every other: relative to the config's folder
        settings = dataclasses.replace(
            settings, sensors=f"file:{base / settings.sensors.removeprefix('file:')}"
        )
    return dataclasses.replace(_section(DeviceHost, own, path, base), settings=settings)


def _section(cls: type[Any], values: dict[str, Any], path: Path, base: Path) -> Any:
    """Build ``cls`` from a TOML table whose keys are the fields with dashes; check names and types."""
    fields = {  # a field without a plain default (DeviceHost.settings) is no TOML key
        f.name.replace("_", "-"): f for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
    }
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {sorted(unknown)}; known: {sorted(fields)}.")
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        spec = fields[key]
        default = spec.default
        if isinstance(default, Path):
            value = base / str(value)
        elif isinstance(default, tuple):
            value = tuple(str(v) for v in value)
        elif type(default) is float and type(value) is int:
            value = float(value)
        elif type(value) is not type(default):
            raise ConfigError(f"{path}: {key} must be {type(default).__name__}, got {value!r}.")
        kwargs[spec.name] = value
    return cls(**kwargs)
