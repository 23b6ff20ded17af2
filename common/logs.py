"""Structured logs: one JSON object a line, a file a day, kept ``retention_days`` days, and their search.

A long-running fleetlora process (``coordinator up``, ``device up``, the ServerApp, a device's ClientApp)
calls :func:`configure_json_logging` once: every record of the ``fleetlora`` logger tree is then written
to ``<directory>/<component>.jsonl`` with its ``extra=`` fields (a round's ``lineage``, ``round``,
``phase``, ``version``; a device's ``device``, ...). The file is rotated at midnight UTC to
``<component>.jsonl.YYYY-MM-DD`` and rotated files beyond ``retention_days`` are deleted.

:func:`search_logs` reads them back for ``logs search``. A log folder is a state folder: any line may be
damaged or hostile, so lines are read bounded (:data:`MAX_LINE_BYTES`) and anything that is not a JSON
object is skipped, never fatal.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, date, datetime, timedelta
from logging.handlers import TimedRotatingFileHandler
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from fleetlora.common.errors import ConfigError

LOGGER = "fleetlora"  # the tree every fleetlora module logs under (logging.getLogger(__name__))
SUFFIX = ".jsonl"
MAX_LINE_BYTES = 1 << 20  # a longer line is skipped without being held in memory whole
DEFAULT_RETENTION_DAYS = 90
CORE_FIELDS = ("ts", "level", "component", "logger", "message")
_COMPONENT = re.compile(r"[a-z][a-z0-9-]{0,31}")
_LOG_FILE = re.compile(rf"(?P<component>{_COMPONENT.pattern})\.jsonl(?:\.(?P<day>\d{{4}}-\d{{2}}-\d{{2}}))?")
_SINCE_AGO = re.compile(r"(?P<count>\d{1,6})(?P<unit>[mhd])")
_UNITS = {"m": "minutes", "h": "hours", "d": "days"}
# What every LogRecord has: anything else on a record came from ``extra=`` and is written out, except
# private attributes (a leading underscore) that another library's record factory adds to every record
# (Ray's ``_ray_timestamp_ns``, once Ray is imported).
_STANDARD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_MAX_DEPTH = 8  # nesting kept in an extra field's value; deeper parts are written as their str()


class JsonFormatter(logging.Formatter):
    """A record as one JSON object: the core fields, then its ``extra=`` fields made JSON-safe."""

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "component": self.component,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRIBUTES and key not in entry and not key.startswith("_"):
                entry[key] = json_safe(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class JsonLinesHandler(TimedRotatingFileHandler):
    """The handler :func:`configure_json_logging` attaches (its class tells it apart from others)."""


class ConsoleHandler(logging.StreamHandler[TextIO]):
    """Warnings and errors on stderr, as Python prints them while no handler is configured."""


def configure_json_logging(
    directory: Path,
    component: str,
    *,
    retention_days: int = DEFAULT_RETENTION_DAYS,
    level: int = logging.INFO,
) -> Path:
    """Write the ``fleetlora`` logger tree's records to ``directory/<component>.jsonl``; that path.

    Idempotent: a second call for the same file adds nothing; a call for another file moves the
    process's logs there. Warnings and errors still reach stderr when nothing else prints them.
    """
    if not _COMPONENT.fullmatch(component):
        raise ConfigError(f"Log component {component!r}: use lowercase letters, digits and dashes.")
    if type(retention_days) is not int or retention_days < 1:
        raise ConfigError(f"Log retention must be a whole number of days >= 1, got {retention_days!r}.")
    path = Path(os.path.abspath(directory / f"{component}{SUFFIX}"))
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        if isinstance(handler, JsonLinesHandler):
            if handler.baseFilename == str(path):
                return path
            logger.removeHandler(handler)
            handler.close()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handler = JsonLinesHandler(
            path, when="midnight", utc=True, backupCount=retention_days, encoding="utf-8"
        )
    except OSError as exc:
        raise ConfigError(
            f"Cannot write logs to {path}: {exc.strerror or exc}. Make the folder writable."
        ) from None
    handler.setFormatter(JsonFormatter(component))
    handler.setLevel(level)
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(level)  # else the root's WARNING would drop INFO records before the handler
    if not logging.getLogger().handlers and not any(isinstance(h, ConsoleHandler) for h in logger.handlers):
        console = ConsoleHandler(sys.stderr)
        console.setLevel(logging.WARNING)
        logger.addHandler(console)
    return path


def json_safe(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON can hold it: containers kept (to a depth), times as ISO text, the rest str()."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if depth < _MAX_DEPTH and isinstance(value, Mapping):
        return {str(k): json_safe(v, depth + 1) for k, v in value.items()}
    if depth < _MAX_DEPTH and isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v, depth + 1) for v in value]
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>"
    return str(value)


# ---- reading


def search_logs(
    directory: Path,
    text: str = "",
    *,
    since: datetime | None = None,
    device: str | None = None,
    component: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Entries of ``directory``'s logs, current and rotated, oldest first (components merged by time).

    ``text`` matches case-insensitively anywhere in the message or any field's value; ``since`` keeps
    entries at or after it (a naive time is UTC); ``device`` matches the ``device`` field exactly.
    """
    if not directory.is_dir():
        raise ConfigError(f"No log folder at {directory}: nothing has logged there yet (check --config).")
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    needle = text.casefold()
    streams = [
        _matching(_entries(files), needle, since, device)
        for name, files in sorted(log_files(directory, since).items())
        if component is None or name == component
    ]
    yield from heapq.merge(*streams, key=lambda entry: str(entry.get("ts", "")))


def log_files(directory: Path, since: datetime | None = None) -> dict[str, list[Path]]:
    """Each component's files, oldest first: rotated ones by day, then the current one.

    A file rotated on day D holds nothing after D: one older than ``since``'s day is left out.
    """
    found: dict[str, list[tuple[str, Path]]] = {}
    oldest = since.astimezone(UTC).date().isoformat() if since else ""
    for path in directory.iterdir():
        match = _LOG_FILE.fullmatch(path.name)
        if match is None or path.is_symlink() or not path.is_file():
            continue
        day = match["day"] or "9999-99-99"  # the current file is the newest
        if day >= oldest:
            found.setdefault(match["component"], []).append((day, path))
    return {name: [path for _, path in sorted(files)] for name, files in found.items()}


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """``--since``: an age (``30m``, ``2h``, ``3d``) or an ISO-8601 time (UTC unless it says)."""
    ago = _SINCE_AGO.fullmatch(value.strip())
    try:
        if ago:
            return (now or datetime.now(UTC)) - timedelta(**{_UNITS[ago["unit"]]: int(ago["count"])})
        moment = datetime.fromisoformat(value.strip())
        # in UTC here, where an offset that moves it past year 1 or 9999 is still a bad --since
        return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    except (ValueError, OverflowError):  # not a time, or one outside the years 1-9999
        raise ConfigError(
            f"--since {value!r}: give an age like 30m, 2h or 3d, or a time like 2026-11-30T10:00."
        ) from None


def _entries(files: Iterable[Path]) -> Iterator[dict[str, Any]]:
    for path in files:
        try:
            stream = path.open("rb")
        except OSError:  # rotated away or deleted since the folder was listed
            continue
        with stream:
            yield from _objects(stream)


def _objects(stream: BinaryIO) -> Iterator[dict[str, Any]]:
    """The JSON objects of a stream's lines; anything else, or a line over MAX_LINE_BYTES, skipped."""
    while line := stream.readline(MAX_LINE_BYTES + 1):
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            while (rest := stream.readline(1 << 16)) and not rest.endswith(b"\n"):
                pass
            continue
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past the parser's depth
            continue
        if isinstance(entry, dict):
            yield entry


def _matching(
    entries: Iterator[dict[str, Any]], needle: str, since: datetime | None, device: str | None
) -> Iterator[dict[str, Any]]:
    for entry in entries:
        if device is not None and (entry.get("device") is None or str(entry["device"]) != device):
            continue
        if since is not None:
            moment = _timestamp(entry.get("ts"))
            if moment is None or moment < since:
                continue
        if needle and not any(needle in _searchable(value) for value in entry.values()):
            continue
        yield entry


def _timestamp(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _searchable(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text.casefold()
