"""Real console servers on 127.0.0.1:0 over real SQLite databases, and one headless Chromium per module."""

from __future__ import annotations

import http.client
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleetlora.common.web import WebServer
from fleetlora.coordinator.console import console_app
from fleetlora.coordinator.console_auth import ConsoleTokens, session_secret
from fleetlora.coordinator.operators import Operators
from tests.console.fleet import TENANT, Fleet, fill

CHROMIUM = Path("/usr/bin/chromium")
IN_CI = os.environ.get("CI") == "true"
CHROMIUM_MISSING = f"{CHROMIUM} is absent: `apt-get install chromium` (Debian's package; .ci/run installs it)"
# Skipped only on a developer's machine without Chromium: in CI a missing browser fails the tests.
needs_chromium = pytest.mark.skipif(not CHROMIUM.is_file() and not IN_CI, reason=CHROMIUM_MISSING)
ONLINE_NODES = {"101", "104"}


@dataclass(frozen=True)
class Console:
    """A console being served: its base URL, its database's fleet and its keys folder."""

    url: str
    port: int
    fleet: Fleet
    keys_dir: Path
    operator_secret: str | None  # the TOTP secret of operator alice, when the console has operators
    operator_key: Path | None

    def login_url(self, tenant: str = TENANT) -> str:
        """What `console login` prints once the operator's key and code check out."""
        token = ConsoleTokens(session_secret(self.keys_dir), tenant).login_token("alice")
        return f"{self.url}/login?token={token}"


@contextmanager
def serving(folder: Path, *, operators: bool, devices: int = 0) -> Iterator[Console]:
    db_url = f"sqlite:///{folder / 'fleet.db'}"
    fleet = fill(db_url, devices=devices)
    secret = key = None
    if operators:
        added = Operators(fleet.storage.db).add("alice", folder / "alice.key")
        secret, key = added.secret, added.key_file
    keys_dir = folder / "keys"
    app = console_app(db_url, TENANT, keys_dir=keys_dir, online_nodes=lambda: ONLINE_NODES)
    server = WebServer(app, host="127.0.0.1", port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    try:
        yield Console(f"http://127.0.0.1:{port}", port, fleet, keys_dir, secret, key)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        fleet.storage.close()
    assert not thread.is_alive(), "the console did not stop"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    """A console whose coordinator has an operator: every page needs a session."""
    with serving(tmp_path_factory.mktemp("guarded"), operators=True) as console:
        yield console


@pytest.fixture(scope="module")
def open_console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    """A console whose coordinator has no operators yet: open, read-only, on loopback."""
    with serving(tmp_path_factory.mktemp("open"), operators=False) as console:
        yield console


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """One headless Debian Chromium for the module (Playwright cannot fetch its own build here)."""
    if not CHROMIUM.is_file():
        pytest.fail(CHROMIUM_MISSING)  # only reached in CI: elsewhere needs_chromium skipped the test
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield launched
        launched.close()


@dataclass(frozen=True)
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: str


def get(url: str, path: str, *, cookie: str | None = None, host: str | None = None) -> Answer:
    """One plain GET (redirects not followed), optionally with a session cookie or another Host."""
    address = url.removeprefix("http://")
    connection = http.client.HTTPConnection(address, timeout=10)
    headers = {"Host": host or address}
    if cookie is not None:
        headers["Cookie"] = f"fleetlora_console={cookie}"
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return Answer(response.status, response.headers, response.read().decode())
    finally:
        connection.close()


def session_cookie(console: Console) -> str:
    """A fresh session cookie, got the way a browser gets one: by opening a login link."""
    answer = get(console.url, console.login_url().removeprefix(console.url))
    assert answer.status == 303, answer.body
    cookie = answer.headers["set-cookie"]
    return cookie.split(";", 1)[0].removeprefix("fleetlora_console=")
