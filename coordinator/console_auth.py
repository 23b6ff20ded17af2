"""Console sessions: a one-time login link made on the coordinator host, redeemed for a session cookie.

``fleetlora coordinator console login`` proves the operator (key file and one-time code, through
:class:`~fleetlora.coordinator.operators.Operators`) and prints a link whose token lives
:data:`LOGIN_SECONDS`; the console redeems it once (a replayed link is refused even before it expires)
for a session cookie that lives :data:`SESSION_SECONDS`. Both are JWTs (HS256) signed with a 32-byte
secret in the coordinator's keys folder, made 0600 on first use: whoever can read that file can make
sessions, as whoever can read the database can read what the console shows. Each token names its
purpose (``aud``), so a login token is no cookie and a cookie no login token, and its tenant, so a
console of one fleet refuses another's.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt

from fleetlora.common.errors import ConfigError, FleetloraError
from fleetlora.common.keys import write_private_key_bytes
from fleetlora.common.trusted_paths import check_trusted

SECRET_FILE = "console-session.key"
SECRET_BYTES = 32
ALGORITHMS = ["HS256"]  # the only one accepted: never the token's own say
LOGIN_SECONDS = 60
SESSION_SECONDS = 15 * 60
MAX_TOKEN_CHARS = 2048  # ours are ~300; anything longer is refused unread
LOGIN_AUDIENCE = "fleetlora-console-login"
SESSION_AUDIENCE = "fleetlora-console-session"
REQUIRED_CLAIMS = ["operator", "tenant", "jti", "exp", "aud"]


class SessionRefused(FleetloraError):
    """A login token or session cookie that is missing, expired, forged, replayed or another fleet's."""


def session_secret(keys_dir: Path) -> bytes:
    """The console's signing secret from ``keys_dir``, made (0600, never replaced) on first use."""
    path = keys_dir / SECRET_FILE
    if not path.exists():
        try:
            write_private_key_bytes(path, secrets.token_bytes(SECRET_BYTES))
        except ConfigError:
            if not path.is_file():  # not another process's head start: a real failure
                raise
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"{path} is readable by other users: run `chmod 600 {path}`.")
    check_trusted(path.parent)
    check_trusted(path)
    secret = path.read_bytes()
    if len(secret) != SECRET_BYTES:
        raise ConfigError(
            f"{path} holds {len(secret)} bytes, not {SECRET_BYTES}: delete it and a new one is made "
            "(every console session ends)."
        )
    return secret


class ConsoleTokens:
    """Issues and checks one tenant's login tokens and session cookies; remembers redeemed logins."""

    def __init__(self, secret: bytes, tenant: str, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret
        self.tenant = tenant
        self._clock = clock  # when tokens are issued; expiry is checked against the real time
        self._redeemed: dict[str, float] = {}  # jti → its expiry: refused until then, forgotten after
        self._lock = threading.Lock()  # pages are served from a thread pool

    def login_token(self, operator: str) -> str:
        return self._issue(operator, LOGIN_AUDIENCE, LOGIN_SECONDS)

    def redeem(self, token: str | None) -> str:
        """A fresh session cookie for a login token's operator; the token is spent."""
        claims = self._verify(token, LOGIN_AUDIENCE, "login link")
        now = time.time()
        with self._lock:
            self._redeemed = {jti: exp for jti, exp in self._redeemed.items() if exp > now}
            if claims["jti"] in self._redeemed:
                raise SessionRefused("This login link was used already: each link logs in once.")
            self._redeemed[claims["jti"]] = float(claims["exp"])
        return self._issue(claims["operator"], SESSION_AUDIENCE, SESSION_SECONDS)

    def session_operator(self, cookie: str | None) -> str:
        """The operator whose valid session cookie this is."""
        return str(self._verify(cookie, SESSION_AUDIENCE, "session")["operator"])

    def _issue(self, operator: str, audience: str, seconds: int) -> str:
        now = int(self._clock())
        claims = {
            "operator": operator,
            "tenant": self.tenant,
            "jti": secrets.token_urlsafe(16),
            "aud": audience,
            "iat": now,
            "exp": now + seconds,
        }
        return jwt.encode(claims, self._secret, algorithm=ALGORITHMS[0])

    def _verify(self, token: str | None, audience: str, what: str) -> dict[str, Any]:
        """The claims of ``token`` once its signature, algorithm, purpose, expiry and tenant check out."""
        if not token:
            raise SessionRefused(f"No {what}.")
        if len(token) > MAX_TOKEN_CHARS:
            raise SessionRefused(f"The {what} is not one this console made.")
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=ALGORITHMS,
                audience=audience,
                options={"require": REQUIRED_CLAIMS},
            )
        except jwt.ExpiredSignatureError:
            raise SessionRefused(f"The {what} has expired.") from None
        except jwt.InvalidTokenError:
            raise SessionRefused(f"The {what} is not one this console made.") from None
        if not all(isinstance(claims[name], str) for name in ("operator", "tenant", "jti")):
            raise SessionRefused(f"The {what} is not one this console made.")
        if claims["tenant"] != self.tenant:
            raise SessionRefused(f"The {what} is for another fleet, not {self.tenant}.")
        return claims
