"""Operators: who may change parameters or settings, proven by a key they hold and a one-time code.

``fleetlora coordinator operator add NAME`` makes the operator's Ed25519 key pair (the private key goes
to a file only they keep, mode 0600) and a TOTP secret (RFC 6238 via ``pyotp``: 6 digits, 30 s steps,
shown once as a provisioning URI for an authenticator app), and stores the public key and the secret in
SQL (the secret sealed at rest when an at-rest key is set). From the first operator on, every command
that changes parameters or settings (``versions revert``, ``devices enroll``, ``devices release``, ``db
rotate-key``, ``operator add``) needs ``--operator NAME --operator-key FILE --otp CODE``:

- the key file must hold the private key of the enrolled public key (it signs a fresh challenge);
- the code must be right for now (one 30 s step either side) and newer than the last code that
  operator used: a replayed code is refused;
- after :data:`MAX_FAILURES` failures within :data:`FAILURE_WINDOW` the operator is locked for
  :data:`LOCKOUT`, right code or not;

every refusal and every success is an audit entry, and the change itself is recorded with the operator
as its actor. What it cannot stop: someone who can write the database or the coordinator's files
directly. They bypass the command line; the audit log's signed checkpoints are what shows their edits.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, cast

import pyotp
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import CursorResult, select, update

from fleetlora.common.delta import sha256_hex
from fleetlora.common.errors import ConfigError, FleetloraError
from fleetlora.common.keys import load_public_key, public_pem, read_private_key, write_private_key
from fleetlora.coordinator.db import Database
from fleetlora.coordinator.models import OperatorRow, utcnow
from fleetlora.coordinator.storage import audit

MAX_FAILURES = 5
FAILURE_WINDOW = timedelta(minutes=15)
LOCKOUT = timedelta(minutes=15)
ISSUER = "fleetlora"
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")


class OperatorRefused(FleetloraError):
    """A command that changes parameters or settings was refused for its operator credentials."""


@dataclass(frozen=True)
class NewOperator:
    name: str
    key_file: Path
    provisioning_uri: str  # for an authenticator app (a QR code of it)
    secret: str  # the same secret, base32, to type in


@dataclass(frozen=True)
class Credentials:
    """What a command was given to prove who runs it."""

    operator: str | None
    key_file: Path | None
    code: str | None


def secret_binding(name: str) -> dict[str, object]:
    """What an operator's sealed TOTP secret is bound to (coordinator/at_rest.py)."""
    return {"kind": "totp-secret", "operator": name}


class Operators:
    """The operators in the coordinator's database, and the check of a command's credentials."""

    def __init__(self, db: Database, clock: Callable[[], datetime] = utcnow) -> None:
        self.db = db
        self.clock = clock

    def exist(self) -> bool:
        with self.db.session() as session:
            return session.scalars(select(OperatorRow.name).limit(1)).first() is not None

    def add(self, name: str, key_file: Path) -> NewOperator:
        """A new operator; the private key goes to ``key_file`` (never replacing a file), the rest to SQL."""
        if not name or len(name) > 64 or not set(name) <= _NAME_CHARS:
            raise ConfigError(f"An operator name is 1-64 of a-z, 0-9, '-', '_' and '.', got {name!r}.")
        with self.db.session() as session:
            if session.get(OperatorRow, name) is not None:
                raise ConfigError(f"Operator {name} exists already: pick another name.")
        key = Ed25519PrivateKey.generate()
        write_private_key(key_file, key)
        secret = pyotp.random_base32()
        with self.db.session() as session:
            session.add(
                OperatorRow(
                    name=name,
                    public_key_pem=public_pem(key.public_key()).decode(),
                    totp_secret=self.db.cipher.seal(secret.encode(), secret_binding(name)),
                )
            )
            audit.append(session, "operator.added", name, {"key_sha256": _fingerprint(key.public_key())})
        uri = pyotp.TOTP(secret).provisioning_uri(name=name, issuer_name=ISSUER)
        return NewOperator(name, key_file, uri, secret)

    def authorize(self, credentials: Credentials, action: str) -> str | None:
        """The operator a command runs as; None while there are no operators (nothing to prove yet).

        Raises :class:`OperatorRefused` with what is wrong and what to do; the refusal is audited.
        """
        if not self.exist():
            return None
        name, key_file, code = credentials.operator, credentials.key_file, credentials.code
        if not (name and key_file and code):
            self._refuse(name or "(none)", action, "missing credentials", count=False)
        now = self.clock()
        with self.db.session() as session:
            row = session.get(OperatorRow, name)
            known = (row.public_key_pem, row.totp_secret, row.last_counter, row.locked_until) if row else None
        if known is None:
            self._refuse(name, action, "no such operator", count=False)
        pem, sealed, last_counter, locked_until = known
        if locked_until is not None and now < locked_until:
            why = f"locked until {locked_until:%H:%M:%S} UTC after repeated failures"
            self._refuse(name, action, why, count=False)
        if not _holds_key(key_file, load_public_key(pem.encode(), Ed25519PublicKey, name)):
            self._refuse(name, action, "the key file does not hold this operator's key")
        totp = pyotp.TOTP(self.db.cipher.open(sealed, secret_binding(name)).decode())
        step = totp.timecode(now)
        candidates = (step - 1, step, step + 1)  # a clock a step off either way
        matched = next((c for c in candidates if hmac.compare_digest(totp.generate_otp(c), code)), None)
        if matched is None:
            self._refuse(name, action, "wrong one-time code")
        if matched <= last_counter:
            self._refuse(name, action, "this one-time code was used already (replayed)")
        with self.db.session() as session:
            # Only if no other command took this code (or a later one) meanwhile: the check and the
            # write are one statement, so two commands racing with one code cannot both pass.
            result = session.execute(
                update(OperatorRow)
                .where(OperatorRow.name == name, OperatorRow.last_counter < matched)
                .values(last_counter=matched, failures=0, failed_since=None)
            )
            taken = cast(CursorResult[Any], result).rowcount == 1
            if taken:
                audit.append(
                    session, "operator.authorized", name, {"action": action}, actor=f"operator {name}"
                )
        if not taken:
            self._refuse(name, action, "this one-time code was used already (replayed)")
        return name

    def _refuse(self, name: str, action: str, why: str, *, count: bool = True) -> NoReturn:
        """Record the refusal (and, for a known operator, the failure toward a lockout), then raise."""
        now = self.clock()
        with self.db.session() as session:
            row = session.get(OperatorRow, name) if count else None
            if row is not None:
                if row.failed_since is None or now - row.failed_since > FAILURE_WINDOW:
                    row.failures, row.failed_since = 0, now
                row.failures += 1
                if row.failures >= MAX_FAILURES:
                    row.locked_until = now + LOCKOUT
            details = {"action": action, "why": why}
            audit.append(session, "operator.refused", name, details, actor=f"operator {name}")
        raise OperatorRefused(
            f"{action} refused for operator {name}: {why}. This coordinator has operators: give "
            "--operator NAME --operator-key FILE --otp CODE (the code from the authenticator app)."
        )


def _holds_key(key_file: Path, public: Ed25519PublicKey) -> bool:
    try:
        private = read_private_key(key_file, Ed25519PrivateKey)
    except ConfigError:
        return False
    challenge = secrets.token_bytes(32)
    try:
        public.verify(private.sign(challenge), challenge)
    except InvalidSignature:
        return False
    return True


def _fingerprint(key: Ed25519PublicKey) -> str:
    return sha256_hex(public_pem(key))
