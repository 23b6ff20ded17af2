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

import asyncio
import csv
import io
import json
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from fleetlora.client.corpus.records import FILE_STAND_IN, Record, short_repr
from fleetlora.common.errors import ConfigError

if TYPE_CHECKING:  # imported where the endpoint is made: the command line starts without a web stack
    from starlette.applications import Starlette
    from starlette.types import Receive

    from fleetlora.client.corpus.pipeline import Outcome, Pipeline  # the caller's: dedup loads NumPy
    from fleetlora.common.web import WebServer

FORMATS = ("jsonl", "csv", "txt")
MAX_HTTP_BODY = 1 << 20  # one request holds at most 1 MiB of records
MAX_METADATA_DEPTH = 16  # deeper metadata is quarantined: nothing downstream recurses into a hostile depth
DRAIN_SECONDS = 2.0  # an oversized body is read and dropped for at most this long before the 413
CONNECTION_SECONDS = 10.0  # a request not whole this long after its connection opened is dropped
MAX_CONNECTIONS = 32  # connections served at once; a request on one more is answered 503
LOOPBACK = ("127.0.0.1", "::1", "localhost")


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
                record = _stand_in(path, device)
                outcomes.append(pipeline.quarantine(record, f"malformed-file: not UTF-8 ({exc.reason})"))
                target = inbox / "failed"
            except (OSError, ValueError, RecursionError) as exc:  # the file, not the agent, is at fault
                record = _stand_in(path, device)
                outcomes.append(
                    pipeline.quarantine(record, f"malformed-file: {type(exc).__name__}: {exc}"[:500])
                )
                target = inbox / "failed"
        else:
            record = _stand_in(path, device)
            outcomes.append(pipeline.quarantine(record, f"unknown-format: {path.suffix or 'no suffix'}"))
        target.mkdir(exist_ok=True)
        path.replace(target / path.name)  # only now: every record of the file is committed
    return outcomes


def _stand_in(path: Path, device: str) -> Record:
    """The quarantine entry for an inbox file no record could be read from: it names the file."""
    return Record(text=path.name, source=f"inbox:{path.name}", device=device, metadata={FILE_STAND_IN: True})


def watch_inbox(
    pipeline: Pipeline, inbox: Path, *, device: str, poll: float = 1.0, stop: threading.Event | None = None
) -> None:
    """Scan ``inbox`` every ``poll`` seconds until ``stop`` is set."""
    inbox.mkdir(parents=True, exist_ok=True)
    stop = stop or threading.Event()
    while not stop.is_set():
        scan_inbox(pipeline, inbox, device=device)
        stop.wait(poll)


def http_server(pipeline: Pipeline, *, host: str = "127.0.0.1", port: int = 0, device: str) -> WebServer:
    """An HTTP server on loopback: ``POST /records`` with a JSON object, a list of them or JSON lines;
    201 once durable, with every record's outcome.

    Starlette on uvicorn (:mod:`fleetlora.common.web`), bound before this returns (``server_address``
    has port 0's pick); ``serve_forever`` serves until ``shutdown``. Bounds: :data:`MAX_HTTP_BODY`
    per request (413, never read whole), :data:`MAX_CONNECTIONS` at once (503), a request must arrive
    whole within :data:`CONNECTION_SECONDS` (and an answer be taken without a stall that long) or its
    connection is dropped, metadata nests at most :data:`MAX_METADATA_DEPTH` deep (that record is
    quarantined, the rest of the request kept).
    """
    if host not in LOOPBACK:
        raise ConfigError(f"The ingest endpoint listens on loopback only; {host!r} is not (use 127.0.0.1).")
    from fleetlora.common.web import WebServer

    return WebServer(
        _ingest_app(pipeline, device=device, max_body=MAX_HTTP_BODY, drain_seconds=DRAIN_SECONDS),
        host=host,
        port=port,
        connection_seconds=CONNECTION_SECONDS,
        max_connections=MAX_CONNECTIONS,
    )


def _ingest_app(pipeline: Pipeline, *, device: str, max_body: int, drain_seconds: float) -> Starlette:
    """The ASGI app behind :func:`http_server`."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    def answer(status: int, document: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
        return Response(json.dumps(document), status, headers, media_type="application/json")

    def too_large() -> Response:
        return answer(413, {"error": f"at most {max_body} bytes per request"}, {"Connection": "close"})

    def ingest(body: bytes) -> list[Outcome]:
        items = _body_items(body.decode("utf-8", errors="replace"), device=device)
        return ingest_items(pipeline, items, source="http", device=device)

    async def records(request: Request) -> Response:
        declared = request.headers.get("content-length")  # h11 has checked that it is a number
        if declared is not None and int(declared) > max_body:
            if request.headers.get("expect", "").lower() != "100-continue":  # else it waits for a word
                await _drain(request.receive, int(declared), drain_seconds)
            return too_large()
        body = bytearray()
        while True:  # read as it arrives: a body past the limit is never held whole
            message = await request.receive()
            if message["type"] != "http.request":  # the client left (or was dropped for stalling)
                return answer(400, {"error": "the request body did not arrive"})
            body += message.get("body", b"")
            if len(body) > max_body:
                await _drain(request.receive, 16 * max_body, drain_seconds)
                return too_large()
            if not message.get("more_body", False):
                break
        outcomes = await run_in_threadpool(ingest, bytes(body))  # the store's work, off the event loop
        return answer(201, {"outcomes": [o.__dict__ for o in outcomes]})

    async def elsewhere(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        return answer(status, {"error": "POST records to /records"}, getattr(exc, "headers", None))

    app = Starlette(
        routes=[Route("/records", records, methods=["POST"])],
        exception_handlers={404: elsewhere, 405: elsewhere},
    )
    app.router.redirect_slashes = False  # /records/ is not /records
    return app


async def _drain(receive: Receive, limit: int, seconds: float) -> None:
    """Read and drop up to ``limit`` more body bytes for up to ``seconds``, so the client sees the
    answer rather than a reset from a socket closed with its data unread."""
    try:
        async with asyncio.timeout(seconds):
            while limit > 0:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return
                limit -= len(message.get("body", b""))
    except TimeoutError:
        pass


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
