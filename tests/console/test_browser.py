"""What an operator sees in a real browser: the pages' tables, plots and live round, and the login flow.

Headless Debian Chromium driven by Playwright against real console servers (tests/console/conftest.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from playwright.sync_api import expect

from fleetlora.coordinator.console_auth import LOGIN_AUDIENCE, SESSION_AUDIENCE
from tests.console.conftest import Console, needs_chromium
from tests.console.fleet import HOSTILE_ID, HOSTILE_METRIC, OTHER_TENANT

pytestmark = needs_chromium
LOGIN_HINT = "fleetlora coordinator console login"


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser context (no cookies) and its page; any JS dialog fails the test."""
    context = browser.new_context()
    opened = context.new_page()
    dialogs: list[str] = []
    opened.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    yield opened
    context.close()
    assert dialogs == [], "a page ran a script"


def logged_in(page: Any, console: Console) -> Any:
    response = page.goto(console.login_url())
    assert response.status == 200
    assert page.url == f"{console.url}/"
    return page


def cells(page: Any, selector: str) -> list[list[str]]:
    """The text of each body row's cells in the table ``selector``."""
    return page.eval_on_selector_all(
        f"{selector} tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))"
    )


def test_without_a_session_each_page_says_how_to_log_in(page, guarded: Console):
    for path in ("/", "/versions", "/packages"):
        response = page.goto(f"{guarded.url}{path}")
        assert response.status == 401
        assert LOGIN_HINT in page.inner_text("body")
        assert page.locator("table").count() == 0  # nothing of the fleet shows


def test_a_login_link_opens_the_overview_and_works_once(page, browser, guarded: Console):
    url = guarded.login_url()
    page.goto(url)
    assert page.url == f"{guarded.url}/"
    assert page.inner_text("nav .who") == "operator alice"
    assert page.inner_text("h1") == "Fleet"

    other = browser.new_context()
    replayed = other.new_page().goto(url)
    assert replayed.status == 401
    assert "used already" in replayed.text()
    other.close()


def test_a_forged_or_other_fleets_cookie_is_refused(page, guarded: Console):
    forged = jwt.encode(
        {"operator": "alice", "tenant": "fleet-a", "jti": "x", "aud": SESSION_AUDIENCE, "exp": 2**40},
        "not-the-console-secret-not-the-console-secret",
        algorithm="HS256",
    )
    secret = (guarded.keys_dir / "console-session.key").read_bytes()
    other_fleet = jwt.encode(
        {"operator": "alice", "tenant": OTHER_TENANT, "jti": "y", "aud": SESSION_AUDIENCE, "exp": 2**40},
        secret,
        algorithm="HS256",
    )
    login_as_cookie = jwt.encode(
        {"operator": "alice", "tenant": "fleet-a", "jti": "z", "aud": LOGIN_AUDIENCE, "exp": 2**40},
        secret,
        algorithm="HS256",
    )
    for cookie, why in (
        (forged, "not one this console made"),
        (other_fleet, "another fleet"),
        (login_as_cookie, "not one this console made"),
    ):
        page.context.clear_cookies()
        page.context.add_cookies([{"name": "fleetlora_console", "value": cookie, "url": guarded.url}])
        response = page.goto(f"{guarded.url}/")
        assert response.status == 401
        assert why in page.inner_text("body")
        assert LOGIN_HINT in page.inner_text("body")


def test_the_overview_shows_each_device_and_the_round_in_progress(page, guarded: Console):
    logged_in(page, guarded)
    rows = {row[0]: row for row in cells(page, "table.devices")}

    assert "other-fleet-device" not in rows  # another tenant's
    #                     device   node   online     version  ε spent  last seen  eligibility  wants
    assert rows["dev-1"][:5] == ["dev-1", "101", "online", "v4", "6.000"]
    assert rows["dev-1"][6:] == ["eligible", "yes"]
    assert rows["dev-2"][2:5] == ["offline", "v3", "5.500"]
    assert rows["dev-2"][6] == "flagged ×1"
    assert rows["dev-3"][6] == "quarantined"
    assert rows["dev-3"][3:6] == ["-", "-", "-"]  # never reported, no DP spend

    assert page.inner_text("#round h2") == "Current round: round 4 of lineage a1a1a1a1a1a1"
    assert page.inner_text("#round .phase") == "training"
    bar = page.locator("#round progress")
    assert (bar.get_attribute("value"), bar.get_attribute("max")) == ("3", "5")
    assert page.inner_text("#round .count") == "3/5"
    assert [row[0] for row in cells(page, "#round table.phases")] == ["sampling", "training"]
    assert page.locator('meta[http-equiv="refresh"]').get_attribute("content") == "5"


def test_the_overview_follows_the_round_by_itself(page, guarded: Console):
    logged_in(page, guarded)
    assert page.inner_text("#round .count") == "3/5"
    ledgers, training = guarded.fleet.storage.ledgers, guarded.fleet.training_phase
    ledgers.advance_phase(training, 5)
    try:  # no click: the page reloads itself every 5 s
        expect(page.locator("#round .count")).to_have_text("5/5", timeout=9000)
        assert page.locator("#round progress").get_attribute("value") == "5"
    finally:
        ledgers.advance_phase(training, 3)  # as the module's other tests expect it


def test_versions_show_their_metrics_and_plots(page, guarded: Console):
    logged_in(page, guarded)
    page.click("nav >> text=Versions")
    rows = cells(page, "table.versions")
    assert [row[0] for row in rows] == ["v4", "v3", "v2", "v1"]  # newest first; fleet-b's v5 absent
    assert rows[0][2:5] == ["v3", "3", "3"]  # parent, round, participants
    assert "central_accuracy=0.88" in rows[0][5] and "federated_eval_accuracy=0.85" in rows[0][5]
    assert f"note={HOSTILE_METRIC}" in rows[0][5]  # shown as text, not markup

    plots = page.locator("svg.plot")
    assert plots.count() == 2
    accuracy = plots.nth(0)
    assert accuracy.get_attribute("aria-label") == f"Accuracy per round (lineage {'a1' * 6})"
    series = {
        line.get_attribute("data-series"): len(line.get_attribute("points").split())
        for line in accuracy.locator("polyline").all()
    }
    assert series == {"central_accuracy": 4, "federated_eval_accuracy": 3}  # rounds 0-3 and 1-3
    epsilon = plots.nth(1).locator("polyline")
    assert len(epsilon.get_attribute("points").split()) == 3  # rounds 1-3
    assert plots.nth(1).locator("circle").count() == 3


def test_packages_show_size_against_the_base_model_and_distribution(page, guarded: Console):
    logged_in(page, guarded)
    page.goto(f"{guarded.url}/packages")
    [row] = cells(page, "table.packages")
    step, codec, size, ratio = row[2:6]
    assert (step, codec, size, ratio) == ("v3 → v4", "int8+zstd", "4500000", "5.00%")
    assert row[8:] == ["1", "1"]  # dev-1 applied it; dev-2's apply failed


def test_hostile_strings_from_the_database_show_as_text(page, guarded: Console):
    logged_in(page, guarded)
    rows = {row[0]: row for row in cells(page, "table.devices")}
    assert HOSTILE_ID in rows  # the id shows, as the characters it is
    assert page.locator("script").count() == 0
    assert page.locator("img").count() == 0


def test_the_open_console_needs_no_login_and_says_so(page, open_console: Console):
    page.goto(f"{open_console.url}/login?token=whatever")  # nothing to log in to: the overview
    assert page.url == f"{open_console.url}/"
    assert "no operators yet" in page.inner_text(".banner")
    assert page.inner_text("nav .who") == "no login"
    assert len(cells(page, "table.devices")) == 4
