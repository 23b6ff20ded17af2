"""``fleetlora coordinator ...``: what an operator runs on the coordinator host."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fleetlora.common.errors import ConfigError
from fleetlora.common.host_config import load_host_config
from fleetlora.common.keys import COORDINATOR_HPKE_PUB, COORDINATOR_SIGNING_PUB, read_public_key
from fleetlora.common.package import MAX_CAP, read_package
from fleetlora.common.terminal import Column, command_group, duration, json_text, print_table
from fleetlora.coordinator import console_cli, deploy_cli, key_sets_cli
from fleetlora.coordinator.cli_options import (
    ConfigOption,
    DbOption,
    JsonOption,
    KeysOption,
    OperatorKey,
    OperatorName,
    OtpCode,
    Target,
    TenantOption,
    as_operator,
    version_id,
)
from fleetlora.coordinator.defaults import DEFAULT_MAX_ERROR, DEFAULT_TTL
from fleetlora.coordinator.logs_cli import logs_app

if TYPE_CHECKING:  # SQLAlchemy, torch and Flower load inside the commands that use them, not for --help
    from fleetlora.coordinator.storage import PackageInfo, VersionInfo

app = command_group(
    "Operate the coordinator: keys, enrolled devices, versions, update packages, the database."
)
versions_app = command_group("Global adapter versions stored in SQL.")
keys_app = command_group("The coordinator's key pairs.")
devices_app = command_group("Devices allowed to upload (the device registry).")
app.add_typer(versions_app, name="versions")
app.add_typer(keys_app, name="keys")
app.add_typer(devices_app, name="devices")
packages_app = command_group("Signed update packages that bring devices to a version.")
app.add_typer(packages_app, name="packages")
app.command("up")(deploy_cli.up)
app.command("status")(deploy_cli.status)
app.add_typer(deploy_cli.certs_app, name="certs")
app.add_typer(deploy_cli.round_app, name="round")
db_app = command_group("The coordinator database's schema (Alembic migrations).")
app.add_typer(db_app, name="db")
operator_app = command_group(
    "Operators: a key and a one-time code each, needed by every command that changes the fleet."
)
app.add_typer(operator_app, name="operator")
audit_app = command_group("The audit log: every change to parameters or settings, hash-chained and signed.")
app.add_typer(audit_app, name="audit")
app.add_typer(console_cli.app, name="console")
app.add_typer(logs_app, name="logs")
app.add_typer(key_sets_cli.app, name="key-set")


@versions_app.command("list")
def list_versions(
    db: DbOption = None,
    config: ConfigOption = None,
    tenant: TenantOption = None,
    as_json: JsonOption = False,
) -> None:
    """List every stored version with its lineage, participants, size and metrics."""
    from fleetlora.coordinator.db import without_password

    target = Target.of(db, config, tenant)
    storage = target.open()
    versions = storage.versions.all()
    if as_json:
        typer.echo(json_text([{**dataclasses.asdict(v), "label": v.label, "held": v.held} for v in versions]))
        return
    packages: dict[int, list[PackageInfo]] = {}
    for package in storage.packages.all():
        packages.setdefault(package.to_version, []).append(package)
    rows = [
        (
            v.label,
            v.lineage[:8],
            f"v{v.parent_id}" if v.parent_id else "-",
            str(v.round),
            str(len(v.participants)),
            str(sum(v.participants.values())),
            f"{v.adapter_bytes / 1024:.0f} KiB",
            _package_cell(v, packages.get(v.id, [])),
            v.adapter_sha256[:12],
            f"{v.key_score:.3f}" if v.key_score is not None else "-",
            "held" if v.held else "released" if v.hold else "-",
            _test_metrics(v.metrics),
        )
        for v in versions
    ]
    print_table(VERSION_COLUMNS, rows, f"versions in {without_password(target.url)}")


def _test_metrics(metrics: dict[str, Any]) -> str:
    """The held-out test set's metrics, e.g. ``accuracy 0.812, loss 0.550`` (``-``: none)."""
    central = sorted((k.removeprefix("central_"), v) for k, v in metrics.items() if k.startswith("central_"))
    return ", ".join(f"{name} {value:.3f}" for name, value in central) or "-"


VERSION_COLUMNS = (
    Column("version"),
    Column("lineage", drop=4),
    Column("parent", drop=2),
    Column("round"),
    Column("devices", drop=3),
    Column("examples", drop=5),
    Column("adapter", drop=1),
    Column("packages", wrap=True, drop=1),
    Column("sha256", drop=6),
    Column("key", drop=2),  # the key-knowledge score (coordinator/retention.py)
    Column("gate"),  # held by the retention gate, or released by an operator
    Column("test metrics", wrap=True),
)


@versions_app.command("revert")
def revert_version(
    version: Annotated[str, typer.Argument(help="The version to go back to, e.g. v7 (see `versions list`).")],
    reason: Annotated[str, typer.Option(help="Why: stored with the new version.")],
    db: DbOption = None,
    config: ConfigOption = None,
    tenant: TenantOption = None,
    operator: OperatorName = None,
    operator_key: OperatorKey = None,
    otp: OtpCode = None,
) -> None:
    """Make an earlier version's adapter the newest again, as a new version that records why.

    Nothing is deleted. The next round trains from the new version and its package brings devices to it.
    """
    storage = Target.of(db, config, tenant).open()
    with as_operator(storage.db, "versions revert", operator, operator_key, otp):
        reverted = storage.versions.revert(version_id(version), reason)
    typer.echo(
        f"{reverted.label} (round {reverted.round}) holds {version}'s adapter; the next round trains from it."
    )


@versions_app.command("release")
def release_version(
    version: Annotated[
        str, typer.Argument(help="The held version to let through, e.g. v7 (`versions list`: gate held).")
    ],
    reason: Annotated[str, typer.Option(help="Why: stored with the hold.")],
    keys: Annotated[
        Path | None,
        typer.Option(
            "--keys",
            help="The coordinator's keys folder: build the version's package now [default: the config's; "
            "without keys the next round builds what devices need].",
        ),
    ] = None,
    db: DbOption = None,
    config: ConfigOption = None,
    tenant: TenantOption = None,
    operator: OperatorName = None,
    operator_key: OperatorKey = None,
    otp: OtpCode = None,
) -> None:
    """Let a version the retention gate held be packaged and distributed; the release (when, why, who)
    is stored with the hold. The next round that completes brings connected devices to the newest
    version not held."""
    from fleetlora.coordinator.keys import load_signing_key
    from fleetlora.coordinator.packages import PackagePolicy, PackageTooLarge, build_package

    storage = Target.of(db, config, tenant).open()
    keys = keys or (load_host_config(config).coordinator.keys_dir if config is not None else None)
    with as_operator(storage.db, "versions release", operator, operator_key, otp):
        released = storage.versions.release(version_id(version), reason)
        typer.echo(f"released {released.label}: it may be packaged and distributed from now on")
        if keys is None:
            return
        try:
            package = build_package(
                storage, released.id, released.parent_id, load_signing_key(keys), PackagePolicy()
            )
        except PackageTooLarge as exc:
            typer.echo(f"no package built: {exc}", err=True)
            return
    typer.echo(f"package {package.id} ({package.package_bytes} bytes) brings its parent's holders to it")


@audit_app.command("list")
def list_audit(
    last: Annotated[int, typer.Option(help="Show only this many of the newest entries (0: all).")] = 20,
    db: DbOption = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """The audit log: every change to parameters or settings, newest last."""
    if last < 0:
        raise typer.BadParameter(f"--last must be 0 (all) or more, got {last}.")
    entries = Target.of(db, config).open(scoped=False).audit.entries()
    newest = entries[-last:] if last else entries
    if as_json:
        typer.echo(json_text([dataclasses.asdict(entry) for entry in newest]))
        return
    rows = [(str(e.seq), e.at[:19], e.actor, e.action, e.subject, e.details) for e in newest]
    print_table(AUDIT_COLUMNS, rows, "audit log")


AUDIT_COLUMNS = (
    Column("#", justify="right"),
    Column("at", drop=1),
    Column("actor", wrap=True),
    Column("action"),
    Column("subject", wrap=True),
    Column("details", wrap=True),
)


@audit_app.command("verify")
def verify_audit(
    keys: Annotated[
        Path | None,
        typer.Option(
            "--keys", help="The keys folder: its signing key's .pub checks the signed checkpoints there."
        ),
    ] = None,
    db: DbOption = None,
    config: ConfigOption = None,
) -> None:
    """Check the audit log's hash chain and, with --keys, its signed checkpoints; exit 1 on any problem."""
    from fleetlora.coordinator.storage.audit import CHECKPOINTS_FILE, read_checkpoints, verify

    storage = Target.of(db, config).open(scoped=False)
    entries = storage.audit.entries()
    key = read_public_key(keys / COORDINATOR_SIGNING_PUB, Ed25519PublicKey) if keys else None
    checkpoints = read_checkpoints(keys / CHECKPOINTS_FILE) if keys else []
    problems = verify(entries, storage.audit.head(), checkpoints, key)
    for problem in problems:
        typer.echo(f"problem: {problem}", err=True)
    if problems:
        raise typer.Exit(1)
    signed = sum(1 for c in checkpoints if not isinstance(c, str))
    typer.echo(
        f"audit log whole: {len(entries)} entries" + (f", {signed} signed checkpoints hold" if keys else "")
    )


@audit_app.command("checkpoint")
def checkpoint_audit(
    keys: KeysOption = Path("keys"), db: DbOption = None, config: ConfigOption = None
) -> None:
    """Sign the newest audit entry with the coordinator's key into KEYS/audit-checkpoints.jsonl (a round
    does this itself after each version)."""
    from fleetlora.coordinator.keys import load_signing_key
    from fleetlora.coordinator.storage.audit import CHECKPOINTS_FILE

    checkpoint = Target.of(db, config).open(scoped=False).audit.checkpoint(load_signing_key(keys), keys)
    typer.echo(f"signed entry {checkpoint.seq} into {keys / CHECKPOINTS_FILE}")


@keys_app.command("init-at-rest")
def init_at_rest_key(
    out: Annotated[
        Path, typer.Option("--out", help="The key file to create (0600; never overwritten).")
    ] = Path("keys/at-rest.key"),
) -> None:
    """Make the AES-256 key that seals adapters, optimizer states, packages and key sets in the database."""
    from fleetlora.coordinator.at_rest import KEY_FILE_ENV, AtRestKey

    key = AtRestKey.create(out)
    typer.echo(
        f"{out} (key {key.key_id.hex()}): export {KEY_FILE_ENV}={out.resolve()} for every coordinator process"
    )


@db_app.command("rotate-key")
def rotate_at_rest_key(
    new_key: Annotated[
        Path, typer.Option("--new-key", help="The key to seal every blob under (`keys init-at-rest`).")
    ],
    db: DbOption = None,
    config: ConfigOption = None,
    operator: OperatorName = None,
    operator_key: OperatorKey = None,
    otp: OtpCode = None,
) -> None:
    """Re-encrypt every blob at rest under NEW_KEY, reading with the key(s) in the environment.

    One row per transaction and resumable: run it again after an interruption. With no key in the
    environment, blobs stored in the clear are encrypted (turning encryption on for existing data).
    """
    from fleetlora.coordinator.at_rest import KEY_FILE_ENV, AtRestKey, BlobCipher
    from fleetlora.coordinator.db import Database
    from fleetlora.coordinator.storage.reseal import reseal_all

    cipher = BlobCipher([AtRestKey.read(new_key), *BlobCipher.from_environment().keys])
    database = Database(Target.of(db, config).url, cipher, create=False).initialize()
    with as_operator(database, "db rotate-key", operator, operator_key, otp):
        counts = reseal_all(database, cipher, progress=typer.echo)
    typer.echo(
        f"{sum(counts.values())} blobs rewritten under {new_key}; now set {KEY_FILE_ENV}={new_key.resolve()}"
    )


@operator_app.command("add")
def add_operator(
    name: Annotated[str, typer.Argument(help="The new operator's name (a-z, 0-9, '-', '_', '.').")],
    key_out: Annotated[
        Path, typer.Option("--key-out", help="Where to write the new operator's private key (0600).")
    ],
    db: DbOption = None,
    config: ConfigOption = None,
    operator: OperatorName = None,
    operator_key: OperatorKey = None,
    otp: OtpCode = None,
) -> None:
    """Add an operator: a key pair and a one-time-code secret. The first needs nothing; every later one
    is added by an existing operator's key and code."""
    from fleetlora.coordinator.operators import Operators

    storage = Target.of(db, config).open(scoped=False, create=True)
    with as_operator(storage.db, "operator add", operator, operator_key, otp):
        added = Operators(storage.db).add(name, key_out)
    typer.echo(f"operator {added.name}: private key in {added.key_file} (keep it to yourself)")
    typer.echo(f"add this to an authenticator app (a QR code of it, or the secret): {added.provisioning_uri}")
    typer.echo(f"secret: {added.secret}  (shown once)")
    typer.echo("From now on, commands that change the fleet need --operator, --operator-key and --otp.")


@db_app.command("upgrade")
def upgrade_database(db: DbOption = None, config: ConfigOption = None) -> None:
    """Migrate the database to this fleetlora's schema (creates it if empty; safe to repeat)."""
    from fleetlora.coordinator.db import Database, without_password

    url = Target.of(db, config).url
    typer.echo(f"{without_password(url)}: schema at revision {Database(url).initialize().revision}")


@keys_app.command("init")
def init_keys_command(
    folder: Annotated[
        Path, typer.Option("--dir", help="Folder for the key files (created, 0600 keys).")
    ] = Path("keys"),
) -> None:
    """Make the HPKE (X25519) key pair devices seal uploads to, and the Ed25519 package-signing key."""
    from fleetlora.coordinator.keys import init_keys

    written = init_keys(folder)
    for path in written:
        typer.echo(str(path))
    typer.echo(f"Give devices {folder / COORDINATOR_HPKE_PUB}; keep the .key files on this host only.")


@devices_app.command("enroll")
def enroll_device(
    device_id: Annotated[str, typer.Option(help="The device's id, as its node config `device-id` says.")],
    public_key: Annotated[Path, typer.Option(help="The device's device-signing.pub (from `device enroll`).")],
    auth_key: Annotated[
        Path | None,
        typer.Option(help="The device's supernode-auth.pub: also register its SuperNode with the SuperLink."),
    ] = None,
    tenant: TenantOption = None,
    db: DbOption = None,
    config: ConfigOption = None,
    operator: OperatorName = None,
    operator_key: OperatorKey = None,
    otp: OtpCode = None,
) -> None:
    """Register a device: its upload-signing key in fleetlora's registry and, with --auth-key, its
    SuperNode with the running SuperLink (`fleetlora coordinator up --config FILE`)."""
    from fleetlora.coordinator.flower_control import register_node

    if auth_key is not None and config is None:  # the SuperLink's connection lives in the config's state-dir
        raise ConfigError(
            "--auth-key registers the SuperNode with the running SuperLink: also pass --config FILE, "
            "the fleetlora.toml `coordinator up` runs with."
        )
    key = read_public_key(public_key, Ed25519PublicKey)
    target = Target.of(db, config, tenant)
    storage = target.open(create=True)
    with as_operator(storage.db, "devices enroll", operator, operator_key, otp):
        host = load_host_config(config).coordinator
        node_id = register_node(host, auth_key, device_id) if auth_key is not None else None
        storage.devices.enroll(device_id, target.tenant, key, node_id)
    typer.echo(f"enrolled {device_id} in {target.tenant}" + (f" as SuperNode {node_id}" if node_id else ""))


@devices_app.command("list")
def list_devices(
    db: DbOption = None,
    config: ConfigOption = None,
    tenant: TenantOption = None,
    as_json: JsonOption = False,
) -> None:
    """Enrolled devices: id, SuperNode node id, when enrolled (`coordinator status` adds who is online)."""
    devices = Target.of(db, config, tenant).open().devices.enrolled()
    if as_json:
        typer.echo(json_text([dataclasses.asdict(d) for d in devices]))
        return
    rows = [(d.device_id, d.node_id or "-", f"{d.enrolled_at:%Y-%m-%d %H:%M}", d.tenant) for d in devices]
    print_table(DEVICE_COLUMNS, rows, f"{len(devices)} enrolled")


DEVICE_COLUMNS = (Column("device"), Column("node"), Column("enrolled", drop=1), Column("tenant", drop=2))


@devices_app.command("quarantined")
def list_quarantined(
    every: Annotated[bool, typer.Option("--all", help="Also the released ones, with why.")] = False,
    db: DbOption = None,
    config: ConfigOption = None,
    tenant: TenantOption = None,
    as_json: JsonOption = False,
) -> None:
    """Devices kept out of rounds after repeated anomalies (deltas out of bounds or broken, counts cut)."""
    store = Target.of(db, config, tenant).open().devices
    entries = store.quarantined(released=every)
    flags = {e.device_id: store.flags(e.device_id)[-3:] for e in entries}
    if as_json:
        last = {d: [{"round": r, "reason": why} for r, why in f] for d, f in flags.items()}
        typer.echo(json_text([{**dataclasses.asdict(e), "last_flags": last[e.device_id]} for e in entries]))
        return
    if not entries:
        typer.echo("No device is in quarantine." if not every else "No device was ever quarantined.")
        return
    columns = QUARANTINE_COLUMNS if every else QUARANTINE_COLUMNS[:4]
    rows = [
        (
            e.device_id,
            f"{e.quarantined_at:%Y-%m-%d %H:%M}",
            e.reason,
            "; ".join(f"r{r}: {why}" for r, why in flags[e.device_id]),
            f"{e.released_at:%Y-%m-%d %H:%M}" if e.released_at else "-",
            e.release_reason or "-",
        )[: len(columns)]
        for e in entries
    ]
    print_table(columns, rows, "quarantined devices")


QUARANTINE_COLUMNS = (
    Column("device"),
    Column("since", drop=1),
    Column("why", wrap=True),
    Column("last flags", wrap=True, drop=2),
    Column("released", drop=1),
    Column("release reason", wrap=True),
)


@devices_app.command("release")
def release_device(
    device_id: Annotated[
        str, typer.Argument(help="The device to let train again (see `devices quarantined`).")
    ],
    reason: Annotated[str, typer.Option(help="Why: stored with the quarantine.")],
    db: DbOption = None,
    config: ConfigOption = None,
    tenant: TenantOption = None,
    operator: OperatorName = None,
    operator_key: OperatorKey = None,
    otp: OtpCode = None,
) -> None:
    """End a device's quarantine; its earlier anomalies no longer count toward the next one."""
    storage = Target.of(db, config, tenant).open()
    with as_operator(storage.db, "devices release", operator, operator_key, otp):
        released = storage.devices.release(device_id, reason)
    typer.echo(f"released {released.device_id} (quarantined {released.quarantined_at:%Y-%m-%d %H:%M})")


def _package_cell(version: VersionInfo, packages: list[PackageInfo]) -> str:
    """The package from the parent (what most devices receive), and how many others lead here."""
    if not packages:
        return "-"
    main = next((p for p in packages if p.from_version == version.parent_id), packages[0])
    others = f" +{len(packages) - 1}" if len(packages) > 1 else ""
    return f"{main.package_bytes / 1024:.0f} KiB ({main.ratio:.2%}){others}"


@packages_app.command("build")
def build_package_command(
    to: Annotated[str, typer.Option("--to", help="The version devices should reach, e.g. v7.")],
    start: Annotated[
        str | None,
        typer.Option("--from", help="The version devices hold now; leave out for the full adapter."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Also write the package to this file.")] = None,
    cap: Annotated[
        float, typer.Option(help="Largest package as a share of the base model (≤ 0.10).")
    ] = MAX_CAP,
    ttl_hours: Annotated[float, typer.Option(help="Hours until devices refuse the package.")] = (
        DEFAULT_TTL.total_seconds() / 3600
    ),
    max_error: Annotated[
        float, typer.Option(help="Largest reconstruction error (relative L2) a lossy codec may cause.")
    ] = DEFAULT_MAX_ERROR,
    keys: KeysOption = Path("keys"),
    db: DbOption = None,
    config: ConfigOption = None,
    tenant: TenantOption = None,
) -> None:
    """Build, sign and store the package FROM → TO with the most faithful codec that fits the cap."""
    from fleetlora.coordinator.keys import load_signing_key
    from fleetlora.coordinator.packages import PackagePolicy, build_package

    storage = Target.of(db, config, tenant).open()
    policy = PackagePolicy(cap=cap, ttl=timedelta(hours=ttl_hours), max_error=max_error)
    package = build_package(
        storage, version_id(to), version_id(start) if start else None, load_signing_key(keys), policy
    )
    _print_packages([package])
    if out is not None:
        out.write_bytes(storage.packages.blob(package.id))
        typer.echo(f"wrote {out} ({package.package_bytes} bytes); apply it with `fleetlora device apply`")


@packages_app.command("list")
def list_packages(
    db: DbOption = None,
    config: ConfigOption = None,
    tenant: TenantOption = None,
    as_json: JsonOption = False,
) -> None:
    """List stored packages: versions, codec, bytes against the base model, reconstruction error."""
    packages = Target.of(db, config, tenant).open().packages.all()
    if as_json:
        typer.echo(json_text([{**dataclasses.asdict(p), "ratio": p.ratio} for p in packages]))
        return
    _print_packages(packages)


@packages_app.command("export")
def export_package(
    package_id: Annotated[int, typer.Argument(help="The package's id (see `packages list`).")],
    out: Annotated[Path, typer.Option(help="File to write.")],
    db: DbOption = None,
    config: ConfigOption = None,
    tenant: TenantOption = None,
) -> None:
    """Write a stored package to a file, for devices reached out of band (`fleetlora device apply`)."""
    blob = Target.of(db, config, tenant).open().packages.blob(package_id)
    out.write_bytes(blob)
    typer.echo(f"wrote {out} ({len(blob)} bytes)")


@packages_app.command("verify")
def verify_package(
    file: Annotated[Path, typer.Argument(help="A package file.", exists=True, dir_okay=False)],
    key: Annotated[Path, typer.Option(help="The coordinator's public signing key.")] = Path("keys")
    / COORDINATOR_SIGNING_PUB,
) -> None:
    """Check a package file's signature and payload hash, and show its manifest."""
    with file.open("rb") as stream:
        package = read_package(stream, read_public_key(key, Ed25519PublicKey))
    typer.echo(f"{file}: signature and payload verified")
    rows = [(k, str(v)) for k, v in dataclasses.asdict(package.manifest).items() if k != "model"]
    print_table((Column("field"), Column("value", wrap=True)), rows)


def _print_packages(packages: list[PackageInfo]) -> None:
    rows = [
        (
            str(p.id),
            f"v{p.from_version}" if p.from_version is not None else "full",
            f"v{p.to_version}",
            p.codec,
            str(p.package_bytes),
            f"{p.ratio:.3%}",
            f"{p.cap:.0%}",
            f"{p.reconstruction_error:.2e}",
            duration(p.build_seconds),
            p.expires_at.strftime("%Y-%m-%d %H:%M"),
        )
        for p in packages
    ]
    print_table(PACKAGE_COLUMNS, rows, "update packages")


PACKAGE_COLUMNS = (
    Column("id", justify="right"),
    Column("from"),
    Column("to"),
    Column("codec"),
    Column("bytes", justify="right"),
    Column("of base", justify="right", drop=2),
    Column("cap", justify="right", drop=3),
    Column("error", justify="right", drop=1),
    Column("build", justify="right", drop=4),
    Column("expires", drop=1),
)
