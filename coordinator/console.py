"""The operators' web console: a read-only view of one fleet, served by the coordinator host.

``/`` the fleet (devices, their versions, ε spent, eligibility) and the current round live;
``/versions`` versions with accuracy and ε plots; ``/packages`` update packages and how their
distribution went; ``/api/round`` the current round as JSON. Everything is read through the storage
stores of the console's tenant, so another tenant's rows never show.

Who may look: while the coordinator has no operators, anyone on this host (the client and the
``Host`` it asked for must both be loopback, which also keeps a web page's DNS-rebinding trick out);
once it has operators, only a browser holding a session from ``fleetlora coordinator console login``
(:mod:`fleetlora.coordinator.console_auth`). Every answer carries a strict Content-Security-Policy
and no page runs a script.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import threading
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleetlora.common.errors import ConfigError, FleetloraError
from fleetlora.coordinator import console_pages as pages
from fleetlora.coordinator.console_auth import SESSION_SECONDS, ConsoleTokens, SessionRefused, session_secret
from fleetlora.coordinator.models import utcnow
from fleetlora.coordinator.operators import Operators
from fleetlora.coordinator.storage import DeviceUpdateInfo, PackageInfo, Storage, VersionInfo
from fleetlora.coordinator.storage.ledgers import ENDED

if TYPE_CHECKING:
    from fleetlora.common.host_config import CoordinatorHost
    from fleetlora.common.web import WebServer

COOKIE = "fleetlora_console"
MAX_ROWS = 500  # a table shows at most this many rows (the newest versions and packages)
LOOPBACK_NAMES = ("localhost",)
OPEN_BANNER = (
    "This coordinator has no operators yet: the console is open, read-only, to anyone on this host. "
    "Add one (fleetlora coordinator operator add) to require a login."
)
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; style-src 'unsafe-inline'; script-src 'none'; "
        b"frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]
ACCURACY_METRICS = ("central_accuracy", "federated_eval_accuracy")
HOLDING = ("applied", "current")  # a device's report that it holds the version a package makes
FAILED_UPDATES = ("failed", "rejected")

OnlineNodes = Callable[[], set[str]]  # the SuperLink's online node ids


class LoopbackOnly(FleetloraError):
    """A request from beyond this host while the console is open (no operators)."""


def console_app(
    db_url: str, tenant: str, *, keys_dir: Path, online_nodes: OnlineNodes | None = None
) -> Starlette:
    """The console over the database at ``db_url``, showing ``tenant``'s rows; sessions are signed
    with the secret in ``keys_dir``; ``online_nodes`` says which devices are online (else: unknown)."""
    storage = Storage.open(db_url, tenant, reader=True)  # never holds up a round's writes
    console = _Console(storage, ConsoleTokens(session_secret(keys_dir), tenant), online_nodes)
    return Starlette(
        routes=[
            Route("/", console.page(console.overview, refresh=True)),
            Route("/versions", console.page(console.versions)),
            Route("/packages", console.page(console.packages)),
            Route("/api/round", console.api_round),
            Route("/login", console.login),
        ],
        middleware=[Middleware(SecurityHeaders)],
    )


def serve_console(host: CoordinatorHost, online_nodes: OnlineNodes | None = None) -> WebServer:
    """The console of ``host`` bound on its console-host:console-port (not yet serving: call
    ``serve_forever``, in a thread to serve beside other work)."""
    from fleetlora.common.web import WebServer

    if not 0 < host.console_port < 65536:
        raise ConfigError(
            f"console-port {host.console_port} is not a port: give 1-65535 (0 turns the console off)."
        )
    app = console_app(host.database_url, host.tenant, keys_dir=host.keys_dir, online_nodes=online_nodes)
    return WebServer(app, host=host.console_host, port=host.console_port)


def start_console(host: CoordinatorHost, online_nodes: OnlineNodes | None = None) -> str:
    """Serve ``host``'s console from a daemon thread (it ends with the process); its URL."""
    server = serve_console(host, online_nodes)
    threading.Thread(target=server.serve_forever, name="console", daemon=True).start()
    return f"http://{host.console_host}:{server.server_address[1]}/"


class SecurityHeaders:
    """ASGI middleware: the same security headers on every answer, whatever route made it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


Page = Callable[[], tuple[str, str]]  # → (title, body HTML)


@dataclasses.dataclass(frozen=True)
class _Console:
    storage: Storage
    tokens: ConsoleTokens
    online_nodes: OnlineNodes | None

    # ---- who may look ----------------------------------------------------------------------

    def viewer(self, request: Request) -> str | None:
        """The operator whose session this request holds; None while the console is open."""
        if Operators(self.storage.db).exist():
            return self.tokens.session_operator(request.cookies.get(COOKIE))
        if not (
            _is_loopback(request.client.host if request.client else "") and _is_loopback(request.url.hostname)
        ):
            raise LoopbackOnly("No operators exist yet, so the console answers on this host only.")
        return None

    def page(self, render: Page, *, refresh: bool = False) -> Callable[[Request], Response]:
        """An endpoint that shows ``render``'s page to a viewer (reloading itself every few seconds
        with ``refresh``), and the login page to anyone else."""

        def endpoint(request: Request) -> Response:  # sync: Starlette runs it in its thread pool
            try:
                operator = self.viewer(request)
            except SessionRefused as exc:
                return HTMLResponse(pages.refused(str(exc)), 401)
            except LoopbackOnly as exc:
                return HTMLResponse(pages.refused(str(exc)), 403)
            title, body = render()
            return HTMLResponse(
                pages.layout(
                    title,
                    body,
                    tenant=self.tokens.tenant,
                    operator=operator,
                    banner=None if operator else OPEN_BANNER,
                    refresh=refresh,
                )
            )

        return endpoint

    def login(self, request: Request) -> Response:
        """Redeem a one-time login link for a session cookie, then show the overview."""
        if not Operators(self.storage.db).exist():
            return RedirectResponse("/", 303)  # nothing to log in to: the console is open
        try:
            cookie = self.tokens.redeem(request.query_params.get("token"))
        except SessionRefused as exc:
            return HTMLResponse(pages.refused(str(exc)), 401)
        response = RedirectResponse("/", 303)
        response.set_cookie(
            COOKIE, cookie, max_age=SESSION_SECONDS, path="/", httponly=True, samesite="strict"
        )
        return response

    def api_round(self, request: Request) -> Response:
        try:
            self.viewer(request)
        except SessionRefused as exc:
            return JSONResponse({"error": f"{exc} Run `fleetlora coordinator console login`."}, 401)
        except LoopbackOnly as exc:
            return JSONResponse({"error": str(exc)}, 403)
        current = self.current_round()
        return JSONResponse(dataclasses.asdict(current) if current else {"round": None})

    # ---- pages -----------------------------------------------------------------------------

    def overview(self) -> tuple[str, str]:
        devices, count = self.device_rows()
        table = pages.table(
            ("device", "node", "online", "version", "ε spent", "last seen", "eligibility", "wants to train"),
            devices,
            empty="No devices yet: enrol them with `fleetlora coordinator devices enroll`.",
            cls="devices",
        )
        return "Fleet", pages.round_section(self.current_round()) + "<h2>Devices</h2>" + table + _more(count)

    def versions(self) -> tuple[str, str]:
        versions = self.storage.versions.all()
        rows = [
            (
                v.label,
                v.lineage[:12],
                f"v{v.parent_id}" if v.parent_id is not None else "-",
                v.round,
                len(v.participants),
                ", ".join(f"{k}={_value(m)}" for k, m in sorted(v.metrics.items())),
            )
            for v in reversed(versions[-MAX_ROWS:])
        ]
        table = pages.table(
            ("version", "lineage", "parent", "round", "participants", "metrics"),
            rows,
            empty="No versions yet: the first round stores one.",
            cls="versions",
        )
        return "Versions", self.plots(versions) + table + _more(len(versions))

    def plots(self, versions: list[VersionInfo]) -> str:
        """Accuracy and ε per round of the newest lineage."""
        if not versions:
            return ""
        lineage = versions[-1].lineage
        accuracy = {
            name: [
                (v.round, float(v.metrics[name]))
                for v in versions
                if v.lineage == lineage and _finite(v.metrics.get(name))
            ]
            for name in ACCURACY_METRICS
        }
        epsilon: dict[int, float] = defaultdict(float)
        for entry in self.storage.ledgers.privacy_ledger(lineage):
            if _finite(entry.epsilon):
                epsilon[entry.round] = max(epsilon[entry.round], entry.epsilon)
        where = f"lineage {lineage[:12]}"
        return pages.line_plot(
            f"Accuracy per round ({where})",
            {name: points for name, points in accuracy.items() if points},
            x_label="round",
            y_label="accuracy",
        ) + pages.line_plot(
            f"Largest ε spent per round ({where})",
            {"max ε": sorted(epsilon.items())},
            x_label="round",
            y_label="ε",
        )

    def packages(self) -> tuple[str, str]:
        packages = self.storage.packages.all()
        spread = _distribution(packages, self.storage.devices.updates())
        rows = [
            (
                p.id,
                p.lineage[:12],
                f"{f'v{p.from_version}' if p.from_version is not None else 'full'} → v{p.to_version}",
                p.codec,
                p.package_bytes,
                f"{p.ratio:.2%}",
                pages.when(p.created_at),
                pages.when(p.expires_at),
                spread[p.id][0],
                spread[p.id][1],
            )
            for p in reversed(packages[-MAX_ROWS:])
        ]
        table = pages.table(
            (
                "id",
                "lineage",
                "step",
                "codec",
                "bytes",
                "of base model",
                "built",
                "expires",
                "applied",
                "failed",
            ),
            rows,
            empty="No update packages yet: rounds build them once the coordinator has signing keys.",
            cls="packages",
        )
        note = (
            '<p class="note">applied and failed count each device\'s last report: one that holds a '
            "package's version (it applied it, or had it already) counts for the newest package to it; "
            "one that failed, for the newest package from the version it still holds.</p>"
        )
        return "Update packages", table + note + _more(len(packages))

    # ---- data ------------------------------------------------------------------------------

    def device_rows(self) -> tuple[list[tuple[str, ...]], int]:
        """The first :data:`MAX_ROWS` devices by id (enrolled, or known from their reports) and how many
        there are."""
        devices = self.storage.devices
        enrolled = {d.device_id: d for d in devices.enrolled()}
        updates = {u.device_id: u for u in devices.updates()}
        epsilon = self.storage.ledgers.epsilon_spent()
        quarantined = {q.device_id for q in devices.quarantined()}
        online = self._online()
        known = sorted(enrolled.keys() | updates.keys())
        rows: list[tuple[str, ...]] = []
        for device_id in known[:MAX_ROWS]:
            update = updates.get(device_id)
            node = enrolled[device_id].node_id if device_id in enrolled else None
            node = node or (update.node_id if update else None)
            rows.append(
                (
                    device_id,
                    node or "-",
                    _online_state(node, online),
                    f"v{update.version_id}" if update and update.version_id is not None else "-",
                    f"{epsilon[device_id]:.3f}" if device_id in epsilon else "-",
                    pages.when(update.reported_at) if update else "-",
                    _eligibility(device_id in quarantined, len(devices.flags(device_id))),
                    ("yes" if update.wants_train else "no") if update else "-",
                )
            )
        return rows, len(known)

    def current_round(self) -> pages.RoundView | None:
        newest = self.storage.ledgers.phases(last_rounds=1)
        if not newest:
            return None
        first = newest[0]  # its sampling phase: another lineage's rows may come between its own
        phases = [p for p in newest if (p.lineage, p.round) == (first.lineage, first.round)]
        last = phases[-1]
        ended = last.phase in ENDED
        end = (last.finished_at or last.updated_at) if ended else utcnow()
        return pages.RoundView(
            lineage=last.lineage,
            round=last.round,
            phase=last.phase,
            done=last.done,
            total=last.total,
            elapsed_seconds=max(0.0, (end - first.started_at).total_seconds()),
            ended=ended,
            detail=last.detail,
            phases=[
                pages.PhaseView(p.phase, p.done, p.total, p.seconds) for p in phases if p.phase not in ENDED
            ],
        )

    def _online(self) -> set[str] | None:
        if self.online_nodes is None:
            return None
        try:
            return {str(node) for node in self.online_nodes()}
        except FleetloraError:
            return None  # the SuperLink is not answering: unknown, not offline


def _distribution(packages: list[PackageInfo], updates: list[DeviceUpdateInfo]) -> dict[int, tuple[int, int]]:
    """Each package's (applied, failed), from each device's last report (see the packages page)."""
    to_version = {p.to_version: p.id for p in packages}  # oldest first: the newest wins
    from_version = {p.from_version: p.id for p in packages}
    applied: dict[int, int] = defaultdict(int)
    failed: dict[int, int] = defaultdict(int)
    for update in updates:
        if update.status in HOLDING and update.version_id in to_version:
            applied[to_version[update.version_id]] += 1
        elif update.status in FAILED_UPDATES and update.version_id in from_version:
            failed[from_version[update.version_id]] += 1
    return {p.id: (applied[p.id], failed[p.id]) for p in packages}


def _online_state(node: str | None, online: set[str] | None) -> str:
    if node is None:
        return "not registered"  # enrolled without a SuperNode: it cannot be online
    if online is None:
        return "unknown"
    return "online" if node in online else "offline"


def _eligibility(quarantined: bool, flags: int) -> str:
    """Whether sampling may pick the device: not while quarantined; flags count toward a quarantine."""
    if quarantined:
        return "quarantined"
    return f"flagged ×{flags}" if flags else "eligible"


def _is_loopback(host: str | None) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address((host or "").strip("[]")).is_loopback
    except ValueError:
        return False


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _value(value: Any) -> str:
    """A metric as a short text: numbers to 4 significant digits, anything else cut at 80 characters."""
    return f"{value:.4g}" if _finite(value) else str(value)[:80]


def _more(count: int) -> str:
    return f'<p class="note">Showing {MAX_ROWS} of {count}.</p>' if count > MAX_ROWS else ""
