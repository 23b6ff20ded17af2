"""Re-encrypting every blob at rest under a new key (a key rotation, or turning encryption on).

One row per transaction, each read with whichever key opens it and written back under the cipher's
current key; a row already under that key is skipped, so a rotation that was killed is finished by
running it again, and nothing is ever left half-written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from fleetlora.coordinator.at_rest import MAGIC, BlobCipher, is_sealed
from fleetlora.coordinator.db import Database
from fleetlora.coordinator.models import KeySet, ModelVersion, OperatorRow, OptimizerState, UpdatePackage
from fleetlora.coordinator.operators import secret_binding
from fleetlora.coordinator.storage.key_sets import key_set_binding
from fleetlora.coordinator.storage.packages import package_binding
from fleetlora.coordinator.storage.versions import adapter_binding, optimizer_binding

# table → (primary key column, blob attribute, the binding of a row)
_BLOBS: dict[type[Any], tuple[Any, str, Callable[[Any], dict[str, object]]]] = {
    ModelVersion: (ModelVersion.id, "adapter", adapter_binding),
    OptimizerState: (
        OptimizerState.version_id,
        "state",
        lambda row: optimizer_binding(row.version_id, row.optimizer),
    ),
    UpdatePackage: (UpdatePackage.id, "package", package_binding),
    OperatorRow: (OperatorRow.name, "totp_secret", lambda row: secret_binding(row.name)),
    KeySet: (KeySet.id, "examples", key_set_binding),
}


def reseal_all(
    db: Database, cipher: BlobCipher, *, progress: Callable[[str], None] = lambda _: None
) -> dict[str, int]:
    """Bring every stored blob under ``cipher``'s current key; how many were rewritten, per table."""
    current = cipher.current_id
    if current is None:
        raise ValueError("A rotation needs a new key to seal under.")
    rewritten: dict[str, int] = {}
    for table, (key_column, attribute, binding) in _BLOBS.items():
        with db.session() as session:
            ids = list(session.scalars(select(key_column).order_by(key_column)))
        count = 0
        for row_id in ids:
            with db.session() as session:
                row = session.get(table, row_id)
                stored: bytes = getattr(row, attribute)
                if is_sealed(stored) and stored[len(MAGIC) : len(MAGIC) + len(current)] == current:
                    continue  # done by an earlier run
                plain = cipher.open(stored, binding(row), allow_clear=True)
                setattr(row, attribute, cipher.seal(plain, binding(row)))
                count += 1
        rewritten[table.__tablename__] = count
        progress(f"{table.__tablename__}: {count} of {len(ids)} rewritten")
    return rewritten
