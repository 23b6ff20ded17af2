"""The console over plain HTTP: security headers, the session cookie, refused tokens, the JSON round,
the open console's loopback rule, the signing secret's file, and `console login` on the command line."""

from __future__ import annotations

import base64
import json
import os
import re
import time
from pathlib import Path

import jwt
import pyotp
import pytest
from click.testing import Result
from typer.testing import CliRunner

from fleetlora.common.errors import ConfigError
from fleetlora.common.host_config import load_host_config
from fleetlora.coordinator.cli import app
from fleetlora.coordinator.console import serve_console
from fleetlora.coordinator.console_auth import (
    LOGIN_AUDIENCE,
    SESSION_AUDIENCE,
    ConsoleTokens,
    session_secret,
)
from fleetlora.coordinator.operators import OperatorRefused
from tests.console.conftest import Console, get, session_cookie
from tests.console.fleet import OTHER_TENANT, TENANT

LOGIN_HINT = "fleetlora coordinator console login"


def _tokens(console: Console, tenant: str = TENANT, *, issued_ago: float = 0) -> ConsoleTokens:
    return ConsoleTokens(session_secret(console.keys_dir), tenant, clock=lambda: time.time() - issued_ago)


def _unsigned(claims: dict[str, object]) -> str:
    """A token that says it needs no signature (alg none)."""
    part = lambda doc: base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()  # noqa: E731
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


@pytest.mark.parametrize("path", ["/", "/versions", "/packages", "/api/round", "/login", "/no-such-page"])
def test_every_answer_carries_the_security_headers(guarded: Console, path: str):
    headers = get(guarded.url, path).headers
    assert headers["content-security-policy"].startswith("default-src 'self'; ")
    assert "script-src 'none'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"


def test_a_login_link_sets_a_strict_http_only_session_cookie(guarded: Console):
    answer = get(guarded.url, guarded.login_url().removeprefix(guarded.url))

    assert (answer.status, answer.headers["location"]) == (303, "/")
    attributes = [part.strip().lower() for part in answer.headers["set-cookie"].split(";")]
    assert {"httponly", "samesite=strict", "path=/", "max-age=900"} <= set(attributes)


def test_api_round_answers_the_current_round_to_a_session_only(guarded: Console):
    refused = get(guarded.url, "/api/round")
    assert refused.status == 401
    assert LOGIN_HINT in json.loads(refused.body)["error"]

    answer = get(guarded.url, "/api/round", cookie=session_cookie(guarded))
    assert answer.status == 200
    assert answer.headers["content-type"] == "application/json"
    current = json.loads(answer.body)
    assert (current["round"], current["phase"], current["done"], current["total"]) == (4, "training", 3, 5)
    assert current["ended"] is False and current["elapsed_seconds"] >= 0
    assert [p["phase"] for p in current["phases"]] == ["sampling", "training"]


@pytest.mark.parametrize(
    ("token", "why"),
    [
        (lambda c: "", "No login link"),
        (lambda c: "not-a-jwt", "not one this console made"),
        (lambda c: "a" * 5000, "not one this console made"),
        (lambda c: _tokens(c, issued_ago=120).login_token("alice"), "has expired"),
        (lambda c: _tokens(c, OTHER_TENANT).login_token("alice"), "another fleet"),
        (lambda c: _tokens(c).redeem(_tokens(c).login_token("alice")), "not one this console made"),
        (
            lambda c: jwt.encode(
                {"operator": "alice", "tenant": TENANT, "jti": "j", "aud": LOGIN_AUDIENCE, "exp": 2**40},
                session_secret(c.keys_dir),
                algorithm="HS512",
            ),
            "not one this console made",
        ),
        (
            lambda c: _unsigned(
                {"operator": "alice", "tenant": TENANT, "jti": "k", "aud": LOGIN_AUDIENCE, "exp": 2**40}
            ),
            "not one this console made",
        ),
        (
            lambda c: jwt.encode(
                {"operator": "alice", "tenant": TENANT, "aud": LOGIN_AUDIENCE, "exp": 2**40},  # no jti
                session_secret(c.keys_dir),
                algorithm="HS256",
            ),
            "not one this console made",
        ),
    ],
    ids=[
        "missing",
        "garbage",
        "oversized",
        "expired",
        "other-fleet",
        "a-session",
        "hs512",
        "alg-none",
        "no-jti",
    ],
)
@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # HS512 with our 32 bytes
def test_a_bad_login_link_is_refused_with_the_way_to_a_good_one(guarded: Console, token, why):
    answer = get(guarded.url, f"/login?token={token(guarded)}")

    assert answer.status == 401
    assert why in answer.body and LOGIN_HINT in answer.body
    assert "set-cookie" not in answer.headers


def test_a_login_link_is_refused_the_second_time(guarded: Console):
    path = guarded.login_url().removeprefix(guarded.url)
    assert get(guarded.url, path).status == 303
    again = get(guarded.url, path)
    assert again.status == 401
    assert "used already" in again.body


def test_an_expired_session_cookie_is_refused(guarded: Console):
    ended = int(time.time()) - 60
    claims = {"operator": "alice", "tenant": TENANT, "jti": "s", "aud": SESSION_AUDIENCE, "exp": ended}
    cookie = jwt.encode(claims, session_secret(guarded.keys_dir), algorithm="HS256")

    answer = get(guarded.url, "/", cookie=cookie)
    assert answer.status == 401
    assert "session has expired" in answer.body


def test_the_open_console_answers_loopback_names_only(open_console: Console):
    assert get(open_console.url, "/", host=f"localhost:{open_console.port}").status == 200
    # A web page that points its own name at 127.0.0.1 (DNS rebinding) asks with its own Host.
    rebound = get(open_console.url, "/", host=f"attacker.example:{open_console.port}")
    assert rebound.status == 403
    assert "this host only" in rebound.body
    assert get(open_console.url, "/api/round", host="attacker.example").status == 403


def test_the_session_secret_is_made_owner_only_once_and_checked(tmp_path: Path):
    keys = tmp_path / "keys"
    secret = session_secret(keys)
    path = keys / "console-session.key"
    assert len(secret) == 32 and os.stat(path).st_mode & 0o777 == 0o600
    assert session_secret(keys) == secret  # kept, not replaced

    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by other users"):
        session_secret(keys)
    path.chmod(0o600)
    path.write_bytes(b"short")
    with pytest.raises(ConfigError, match="holds 5 bytes, not 32"):
        session_secret(keys)


def _config(tmp_path: Path, console: Console, **settings: object) -> Path:
    """The host config of ``console``'s coordinator (its database, keys folder, tenant and port)."""
    state = console.keys_dir.parent
    lines = [
        "[coordinator]",
        f'state-dir = "{state}"',
        f'database = "sqlite:///{state / "fleet.db"}"',
        f'tenant = "{TENANT}"',
        f"console-port = {console.port}",
        *(f"{key} = {json.dumps(value)}" for key, value in settings.items()),
    ]
    path = tmp_path / "fleetlora.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _login(config: Path, key: Path, code: str) -> Result:
    args = ["console", "login", "--config", str(config), "--operator", "alice"]
    return CliRunner().invoke(app, [*args, "--operator-key", str(key), "--otp", code])


def test_console_login_prints_a_link_that_logs_in_once_the_operator_proves_it_is_them(
    tmp_path: Path, guarded: Console
):
    config, key = _config(tmp_path, guarded), guarded.operator_key
    assert guarded.operator_secret is not None and key is not None
    code = pyotp.TOTP(guarded.operator_secret).now()
    wrong = _login(config, key, f"{(int(code) + 1) % 1_000_000:06d}")
    assert isinstance(wrong.exception, OperatorRefused)
    assert "login?token=" not in wrong.output

    done = _login(config, key, code)
    assert done.exit_code == 0, done.output
    [url] = re.findall(r"http://\S+", done.output)
    assert url.startswith(f"{guarded.url}/login?token=")
    assert get(guarded.url, url.removeprefix(guarded.url)).status == 303


def test_console_login_without_operators_says_none_is_needed(tmp_path: Path, open_console: Console):
    done = _login(_config(tmp_path, open_console), tmp_path / "no.key", "123456")
    assert isinstance(done.exception, ConfigError)
    assert "no operators" in str(done.exception)


def test_console_settings_come_from_the_host_config_and_are_checked(tmp_path: Path):
    path = tmp_path / "fleetlora.toml"
    path.write_text('[coordinator]\nconsole-host = "127.0.0.2"\nconsole-port = 8471\n')
    host = load_host_config(path).coordinator
    assert (host.console_host, host.console_port) == ("127.0.0.2", 8471)
    default = load_host_config(None).coordinator
    assert (default.console_host, default.console_port) == ("127.0.0.1", 8470)  # loopback unless told

    for port, why in ((0, "0 turns the console off"), (70000, "not a port"), (-1, "not a port")):
        path.write_text(f'[coordinator]\nstate-dir = "state"\nconsole-port = {port}\n')
        with pytest.raises(ConfigError, match=why):
            serve_console(load_host_config(path).coordinator)
