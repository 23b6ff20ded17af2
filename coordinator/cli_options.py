"""What the ``fleetlora coordinator`` commands share: the database options, the operator's
credentials, and how a command opens the database it acts on and proves who runs it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fleetlora.common.host_config import load_host_config
from fleetlora.coordinator import deploy_cli
from fleetlora.coordinator.defaults import DEFAULT_DB

if TYPE_CHECKING:  # SQLAlchemy loads inside the commands that use it, not for --help
    from fleetlora.coordinator.db import Database
    from fleetlora.coordinator.storage import Storage

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        help=f"SQLAlchemy URL of the coordinator database; wins over --config [default: the config's, "
        f"else {DEFAULT_DB}].",
    ),
]
ConfigOption = deploy_cli.ConfigOption
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts: a list of objects.")]
KeysOption = Annotated[Path, typer.Option("--keys", help="The coordinator's keys folder (`keys init`).")]
TenantOption = Annotated[
    str | None,
    typer.Option(
        "--tenant",
        help="The fleet whose rows to see or change; no other's are shown "
        "[default: the config's, else default].",
    ),
]
DEFAULT_TENANT = "default"  # the host config's and the run config's default


OperatorName = Annotated[
    str | None, typer.Option("--operator", help="Your operator name, once the coordinator has operators.")
]
OperatorKey = Annotated[
    Path | None, typer.Option("--operator-key", help="Your operator key file (`operator add` wrote it).")
]
OtpCode = Annotated[str | None, typer.Option("--otp", help="The one-time code your authenticator app shows.")]


@dataclass(frozen=True)
class Target:
    """The database a command acts on and the fleet it sees: --db and --tenant, else --config's."""

    url: str
    tenant: str

    @classmethod
    def of(cls, db: str | None, config: Path | None, tenant: str | None = None) -> Target:
        host = load_host_config(config).coordinator if config is not None else None
        return cls(
            db or (host.database_url if host else DEFAULT_DB),
            tenant or (host.tenant if host else DEFAULT_TENANT),
        )

    def open(self, *, scoped: bool = True, create: bool = False) -> Storage:
        """:meth:`Storage.open`, imported when a command runs. ``create``: only commands that may
        start a fleet (`db upgrade`, `operator add`, `devices enroll`) make a missing database."""
        from fleetlora.coordinator.storage import Storage

        return Storage.open(self.url, self.tenant if scoped else None, create=create)


@contextmanager
def as_operator(
    db: Database, action: str, operator: str | None, key: Path | None, otp: str | None
) -> Iterator[None]:
    """Run a change as the operator its credentials prove (every change, once operators exist)."""
    from fleetlora.coordinator.operators import Credentials, Operators
    from fleetlora.coordinator.storage.audit import acting_as

    name = Operators(db).authorize(Credentials(operator, key, otp), action)
    with acting_as(name):
        yield


def version_id(label: str) -> int:
    """``v7`` or ``7`` → 7."""
    try:
        return int(label.removeprefix("v"))
    except ValueError:
        raise typer.BadParameter(
            f"{label!r} is not a version: use an id such as v7 (see `versions list`)."
        ) from None
