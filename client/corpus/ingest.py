"""Where records arrive: files dropped in an inbox folder, standard input, and an HTTP endpoint on loopback.

Each source turns its input into :class:`Record` s and hands them to the :class:`Pipeline`; a line it
cannot parse becomes a quarantined record holding the raw line and the parse error, so nothing that
arrived is lost. Formats:

* ``.jsonl``: one JSON object per line, ``{"text": ..., "label": ..., "modality": "text"|"image"|"audio",
  "metadata": {...}}`` (for media, ``text`` is the file's path);
* ``.csv``: a header with a ``text`` column and optional ``label`` (BANKING77's ``category`` too);
* ``.txt``: one text per line.

The inbox moves a file to ``done/`` only after every record in it is committed; a crash before that
re-reads the file at the next start, and exact dedup keeps records from being stored twice.
"""

from __future__ import annotations

import csv
import io
import json
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TextIO

from fleetlora.client.corpus.pipeline import Outcome, Pipeline
from fleetlora.client.corpus.records import Record, short_repr
from fleetlora.common.errors import ConfigError

FORMATS = ("jsonl", "csv", "txt")
MAX_HTTP_BODY = 1 << 20  # one request holds at most 1 MiB of records
MAX_METADATA_DEPTH = 16  # deeper metadata is quarantined: nothing downstream recurses into a hostile depth
DRAIN_SECONDS = 2.0
CONNECTION_SECONDS = 10.0  # a connection that sends nothing for this long is closed
MAX_CONNECTIONS = 32  # connections served at once; more are closed at once
LOOPBACK = ("127.0.0.1", "::1", "localhost")


class _Server(ThreadingHTTPServer):
    """One thread a connection, at most :data:`MAX_CONNECTIONS` at once: a client that opens more is
    closed at once, so idle or half-sent connections cannot hold every thread and file descriptor."""

    daemon_threads = True
    request_queue_size = 128  # socketserver's 5 drops SYNs under bursts (a 1 s retry each)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # over the limit: refused, not queued
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Server6(_Server):
    address_family = socket.AF_INET6


def parse(stream: TextIO, fmt: str, *, source: str, device: str) -> Iterator[Record | tuple[str, str]]:
    """Records from ``stream``; a line that does not parse comes out as ``(raw line, reason)``."""
    if fmt not in FORMATS:
        raise ConfigError(f"Unknown format {fmt!r}: use one of {', '.join(FORMATS)}.")
    if fmt == "txt":
        for line in stream:
            if line.strip():
                yield Record(text=line.rstrip("\r\n"), source=source, device=device)
        return
    if fmt == "csv":
        reader = csv.DictReader(stream)
        if not reader.fieldnames or "text" not in reader.fieldnames:
            yield (",".join(reader.fieldnames or []), "malformed-csv: no `text` column in the header")
            return
        try:
            for row in reader:
                label = row.get("label") or row.get("category") or None
                yield Record(text=row.get("text") or "", source=source, device=device, label=label)
        except csv.Error as exc:
            yield (f"line {reader.line_num}", f"malformed-csv: {exc}")
        return
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            yield _from_json(json.loads(line), source=source, device=device)
        except (ValueError, TypeError, RecursionError) as exc:
            yield (line.rstrip("\r\n"), f"malformed-jsonl: line {number}: {exc}"[:500])


def _from_json(document: Any, *, source: str, device: str) -> Record:
    if not isinstance(document, dict) or not isinstance(document.get("text"), str):
        raise ValueError("expected an object with a string `text`")
    modality = document.get("modality", "text")
    if modality not in ("text", "image", "audio"):
        raise ValueError(f"unknown modality {modality!r}")
    metadata = document.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ValueError("`metadata` must be an object")
    if _depth(metadata) > MAX_METADATA_DEPTH:
        raise ValueError(f"`metadata` nests deeper than {MAX_METADATA_DEPTH} levels")
    label = document.get("label")
    return Record(
        text=document["text"],
        source=source,
        device=device,
        modality=modality,
        label=str(label) if label is not None else None,
        metadata=metadata,
    )


def _depth(value: Any) -> int:
    """How deeply ``value`` (parsed JSON) nests, counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def ingest_stream(pipeline: Pipeline, stream: TextIO, fmt: str, *, source: str, device: str) -> list[Outcome]:
    """Every record of ``stream`` through the pipeline; unparseable lines are quarantined."""
    return ingest_items(
        pipeline, parse(stream, fmt, source=source, device=device), source=source, device=device
    )


def ingest_items(
    pipeline: Pipeline, items: Iterable[Record | tuple[str, str]], *, source: str, device: str
) -> list[Outcome]:
    """Parsed records through the pipeline; ``(raw, reason)`` items are quarantined as they came."""
    outcomes = []
    for item in items:
        if isinstance(item, tuple):
            raw, reason = item
            outcomes.append(pipeline.quarantine(Record(text=raw, source=source, device=device), reason))
        else:
            outcomes.append(pipeline.ingest(item))
    return outcomes


def scan_inbox(pipeline: Pipeline, inbox: Path, *, device: str) -> list[Outcome]:
    """Ingest every file in ``inbox`` once, oldest first, then move it to ``done/`` (or ``failed/``)."""
    outcomes: list[Outcome] = []
    files = sorted((p for p in inbox.iterdir() if p.is_file() and not p.name.startswith(".")), key=_mtime)
    for path in files:
        fmt = path.suffix.lstrip(".").lower()
        target = inbox / ("done" if fmt in FORMATS else "failed")
        if fmt in FORMATS:
            try:
                with path.open(encoding="utf-8", errors="strict", newline="") as stream:
                    outcomes += ingest_stream(
                        pipeline, stream, fmt, source=f"inbox:{path.name}", device=device
                    )
            except UnicodeDecodeError as exc:
                record = Record(text=path.name, source=f"inbox:{path.name}", device=device)
                outcomes.append(pipeline.quarantine(record, f"malformed-file: not UTF-8 ({exc.reason})"))
                target = inbox / "failed"
            except (OSError, ValueError, RecursionError) as exc:  # the file, not the agent, is at fault
                record = Record(text=path.name, source=f"inbox:{path.name}", device=device)
                outcomes.append(
                    pipeline.quarantine(record, f"malformed-file: {type(exc).__name__}: {exc}"[:500])
                )
                target = inbox / "failed"
        else:
            record = Record(text=path.name, source=f"inbox:{path.name}", device=device)
            outcomes.append(pipeline.quarantine(record, f"unknown-format: {path.suffix or 'no suffix'}"))
        target.mkdir(exist_ok=True)
        path.replace(target / path.name)  # only now: every record of the file is committed
    return outcomes


def watch_inbox(
    pipeline: Pipeline, inbox: Path, *, device: str, poll: float = 1.0, stop: threading.Event | None = None
) -> None:
    """Scan ``inbox`` every ``poll`` seconds until ``stop`` is set."""
    inbox.mkdir(parents=True, exist_ok=True)
    stop = stop or threading.Event()
    while not stop.is_set():
        scan_inbox(pipeline, inbox, device=device)
        stop.wait(poll)


def http_server(
    pipeline: Pipeline, *, host: str = "127.0.0.1", port: int = 0, device: str
) -> ThreadingHTTPServer:
    """An HTTP server on loopback: ``POST /records`` with a JSON object or list; 201 once durable.

    Each request is answered with every record's outcome, once they are committed.
    """
    if host not in LOOPBACK:
        raise ConfigError(f"The ingest endpoint listens on loopback only; {host!r} is not (use 127.0.0.1).")

    class Handler(BaseHTTPRequestHandler):
        timeout = CONNECTION_SECONDS  # every read and write on the socket; a stalled client is dropped

        def do_POST(self) -> None:
            if self.path != "/records":
                self._answer(404, {"error": "POST records to /records"})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0:
                self.close_connection = True
                self._answer(400, {"error": "Content-Length must be a number of bytes"})
                return
            if length > MAX_HTTP_BODY:
                self.close_connection = True
                self._drain(length)
                self._answer(413, {"error": f"at most {MAX_HTTP_BODY} bytes per request"})
                return
            body = self.rfile.read(length).decode("utf-8", errors="replace")
            items = _body_items(body, device=device)
            outcomes = ingest_items(pipeline, items, source="http", device=device)
            self._answer(201, {"outcomes": [o.__dict__ for o in outcomes]})

        def _drain(self, length: int) -> None:
            """Read (and drop) what the client sends, so it sees the answer rather than a reset; a
            client that stops sending is answered after a short wait."""
            remaining = min(length, 16 * MAX_HTTP_BODY)
            self.connection.settimeout(DRAIN_SECONDS)
            try:
                while remaining > 0:
                    chunk = self.rfile.read1(min(remaining, 1 << 16))
                    if not chunk:
                        break
                    remaining -= len(chunk)
            except TimeoutError:
                pass

        def _answer(self, status: int, document: dict[str, Any]) -> None:
            blob = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(blob)))
            self.end_headers()
            self.wfile.write(blob)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: outcomes are in the store

    return (_Server6 if ":" in host else _Server)((host, port), Handler)


def _body_items(body: str, *, device: str) -> Iterator[Record | tuple[str, str]]:
    """A request body (one object, a list of objects, or JSON lines) as parsed records; what does not
    parse comes out as ``(raw, reason)``, a list item by item."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # JSON lines, or garbage the parser quarantines line by line
        yield from parse(io.StringIO(body), "jsonl", source="http", device=device)
        return
    items = document if isinstance(document, list) else [document]
    for number, item in enumerate(items, start=1):
        try:
            yield _from_json(item, source="http", device=device)
        except (ValueError, TypeError) as exc:
            yield (short_repr(item), f"malformed-json: item {number}: {exc}"[:500])


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return time.time()
