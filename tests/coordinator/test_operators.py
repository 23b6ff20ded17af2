"""Operators (coordinator/operators.py): once one exists, every change to the fleet needs an operator's key
and a fresh one-time code; wrong, replayed and missing codes are refused, audited and rate-limited."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyotp
import pytest
import torch
from typer.testing import CliRunner

from fleetlora.coordinator.cli import app
from fleetlora.coordinator.operators import LOCKOUT, MAX_FAILURES, Credentials, OperatorRefused, Operators
from fleetlora.coordinator.storage import NewVersion, Storage


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def setup(db_url: str, tmp_path: Path) -> tuple[Storage, Operators, Clock, str, Path]:
    storage = Storage.open(db_url)
    clock = Clock()
    operators = Operators(storage.db, clock)
    added = operators.add("alice", tmp_path / "alice.key")
    return storage, operators, clock, added.secret, added.key_file


def _code(secret: str, clock: Clock, steps: int = 0) -> str:
    return pyotp.TOTP(secret).at(clock.now + timedelta(seconds=30 * steps))


def _refusals(storage: Storage) -> list[str]:
    return [json.loads(e.details)["why"] for e in storage.audit.entries() if e.action == "operator.refused"]


def test_the_right_key_and_a_fresh_code_authorize_once(setup):
    storage, operators, clock, secret, key = setup
    code = _code(secret, clock)

    assert operators.authorize(Credentials("alice", key, code), "versions revert") == "alice"
    with pytest.raises(OperatorRefused, match="used already \\(replayed\\)"):
        operators.authorize(Credentials("alice", key, code), "versions revert")
    clock.now += timedelta(seconds=30)
    assert operators.authorize(Credentials("alice", key, _code(secret, clock)), "devices release") == "alice"
    authorized = [e for e in storage.audit.entries() if e.action == "operator.authorized"]
    assert [e.actor for e in authorized] == ["operator alice"] * 2


@pytest.mark.parametrize(
    ("credentials", "why"),
    [
        (
            lambda s, k, c: Credentials("alice", k, "000000" if c != "000000" else "111111"),
            "wrong one-time code",
        ),
        (lambda s, k, c: Credentials("alice", k, None), "missing credentials"),
        (lambda s, k, c: Credentials(None, None, None), "missing credentials"),
        (lambda s, k, c: Credentials("mallory", k, c), "no such operator"),
        (lambda s, k, c: Credentials("alice", s, c), "does not hold this operator's key"),
    ],
)
def test_wrong_missing_or_someone_elses_credentials_are_refused_and_audited(
    setup, tmp_path, credentials, why
):
    storage, operators, clock, secret, key = setup
    other_key = tmp_path / "other.key"
    Operators(storage.db, clock).add("bob", other_key)  # bob's key is not alice's

    with pytest.raises(OperatorRefused, match="--operator NAME --operator-key FILE --otp CODE"):
        operators.authorize(credentials(other_key, key, _code(secret, clock)), "versions revert")

    assert why in _refusals(storage)[-1]


def test_repeated_failures_lock_the_operator_even_with_the_right_code(setup):
    storage, operators, clock, secret, key = setup
    assert not _refusals(storage)
    for _ in range(MAX_FAILURES):
        with pytest.raises(OperatorRefused, match="wrong one-time code"):
            operators.authorize(Credentials("alice", key, "123456x"), "versions revert")

    with pytest.raises(OperatorRefused, match="locked until"):
        operators.authorize(Credentials("alice", key, _code(secret, clock)), "versions revert")
    clock.now += LOCKOUT + timedelta(seconds=1)
    assert operators.authorize(Credentials("alice", key, _code(secret, clock)), "versions revert") == "alice"


def test_without_operators_nothing_is_asked(db_url: str):
    assert Operators(Storage.open(db_url).db).authorize(Credentials(None, None, None), "x") is None


def test_cli_changes_need_an_operator_once_one_exists_and_are_recorded_as_theirs(db_url: str, tmp_path: Path):
    storage = Storage.open(db_url)
    storage.versions.register_lineage("L", "default", {}, "b" * 64, 1)  # the CLI's default tenant
    v1 = storage.versions.add(
        NewVersion(
            lineage="L", round=0, parent_id=None, base_model_sha256="b" * 64,
            adapter={"w": torch.zeros(2)}, participants={}, metrics={},
        )
    )  # fmt: skip
    storage.versions.add(
        NewVersion(
            lineage="L", round=1, parent_id=v1.id, base_model_sha256="b" * 64,
            adapter={"w": torch.ones(2)}, participants={}, metrics={},
        )
    )  # fmt: skip
    runner = CliRunner()
    key = tmp_path / "alice.key"
    added = runner.invoke(app, ["operator", "add", "alice", "--key-out", str(key), "--db", db_url])
    assert added.exit_code == 0 and "otpauth://totp/" in added.output
    secret = added.output.split("secret: ")[1].split()[0]

    refused = runner.invoke(app, ["versions", "revert", "v1", "--reason", "bad", "--db", db_url])
    assert refused.exit_code != 0 and "missing credentials" in str(refused.exception)
    a_second = runner.invoke(
        app, ["operator", "add", "eve", "--key-out", str(tmp_path / "eve.key"), "--db", db_url]
    )
    assert a_second.exit_code != 0  # only an operator adds operators
    done = runner.invoke(
        app,
        ["versions", "revert", "v1", "--reason", "bad", "--db", db_url,
         "--operator", "alice", "--operator-key", str(key), "--otp", pyotp.TOTP(secret).now()],
    )  # fmt: skip
    assert done.exit_code == 0, done.output

    (reverted,) = [e for e in Storage.open(db_url).audit.entries() if e.action == "version.reverted"]
    assert reverted.actor == "operator alice"
