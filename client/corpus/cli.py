"""``fleetlora device ingest`` and ``fleetlora device quarantine``: the corpus from a person's side."""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fleetlora.client.corpus.ingest import FORMATS, http_server, ingest_stream, scan_inbox, watch_inbox
from fleetlora.client.corpus.store import CORPUS_FILE, CorpusStore
from fleetlora.common.terminal import Column, command_group, json_text, print_table
from fleetlora.common.trusted_paths import make_trusted_folder

if TYPE_CHECKING:  # the pipeline (NumPy, MinHash) and the model (torch) load in the commands that use them
    from fleetlora.client.corpus.pipeline import Pipeline

StateDir = Annotated[
    Path, typer.Option(help=f"The device's state folder; the corpus is {CORPUS_FILE} in it.")
]
QuarantinedId = Annotated[str, typer.Argument(help="The record's id (see `quarantine list`).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts: a list of objects.")]
MAINTAIN_SECONDS = 30.0  # while serving: archive old records and evict past the capacity this often

quarantine_app = command_group("Records held back from the corpus, with the reason.")


def open_store(state_dir: Path, capacity_mb: float | None = None, hot_days: float = 7.0) -> CorpusStore:
    make_trusted_folder(state_dir)
    capacity = int(capacity_mb * 2**20) if capacity_mb is not None else None
    return CorpusStore(state_dir / CORPUS_FILE, capacity_bytes=capacity, hot_days=hot_days)


def ingest(
    state_dir: StateDir,
    device_id: Annotated[str, typer.Option(help="This device's id, stamped on every record.")] = "device",
    inbox: Annotated[
        Path | None, typer.Option(help="Ingest the files in this folder (jsonl, csv, txt).")
    ] = None,
    watch: Annotated[
        bool, typer.Option(help="Keep watching the inbox (and serving HTTP) until Ctrl-C.")
    ] = False,
    stdin: Annotated[bool, typer.Option("--stdin", help="Read records from standard input.")] = False,
    fmt: Annotated[str, typer.Option("--format", help=f"Format on stdin: {', '.join(FORMATS)}.")] = "jsonl",
    http: Annotated[
        int | None, typer.Option(help="Serve POST /records on 127.0.0.1:PORT until Ctrl-C (0 picks a port).")
    ] = None,
    threshold: Annotated[float, typer.Option(help="Near-duplicate similarity, in [0.85, 0.95].")] = 0.9,
    capacity_mb: Annotated[
        float | None, typer.Option(help="Corpus size limit [default: 10% of the free disk]; oldest go first.")
    ] = None,
    hot_days: Annotated[
        float, typer.Option(help="Days a record stays uncompressed before the cold tier.")
    ] = 7.0,
) -> None:
    """Take new records into the device's corpus: quality rules, de-duplication, durable store."""
    from fleetlora.client.corpus.pipeline import Pipeline

    if not (inbox or stdin or http is not None):
        raise typer.BadParameter("Say where records come from: --inbox DIR, --stdin or --http PORT.")
    with open_store(state_dir, capacity_mb, hot_days) as store:
        pipeline = Pipeline(store, threshold=threshold)
        if stdin:
            ingest_stream(pipeline, sys.stdin, fmt, source="stdin", device=device_id)
        if inbox and not watch:
            inbox.mkdir(parents=True, exist_ok=True)
            scan_inbox(pipeline, inbox, device=device_id)
        if watch or http is not None:
            _serve(pipeline, inbox if watch else None, http, device_id)
        store.maintain()
    counts = pipeline.counts
    typer.echo(", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "nothing new")


def _serve(pipeline: Pipeline, inbox: Path | None, port: int | None, device: str) -> None:
    """Serve until Ctrl-C (or SIGTERM), maintaining the store every ``MAINTAIN_SECONDS`` meanwhile.

    The signal only sets ``stop``: a KeyboardInterrupt raised wherever the main thread happened to be (in
    the store's maintenance, between a lock's acquire and its release) could leave the store locked for
    the maintenance that follows, and the agent would never exit.
    """
    stop = threading.Event()
    threads = []
    server = None
    if port is not None:
        server = http_server(pipeline, port=port, device=device)
        typer.echo(f"POST records to http://127.0.0.1:{server.server_address[1]}/records (Ctrl-C stops)")
        threads.append(threading.Thread(target=server.serve_forever, daemon=True))
    if inbox is not None:
        typer.echo(f"watching {inbox} (Ctrl-C stops)")
        threads.append(
            threading.Thread(
                target=watch_inbox, args=(pipeline, inbox), kwargs={"device": device, "stop": stop}
            )
        )
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    for thread in threads:
        thread.start()
    maintained = time.monotonic()
    try:
        while not stop.is_set() and any(t.is_alive() for t in threads):
            stop.wait(timeout=0.5)
            if not stop.is_set() and time.monotonic() - maintained >= MAINTAIN_SECONDS:
                pipeline.maintain()  # the capacity holds while serving
                maintained = time.monotonic()
    finally:
        stop.set()
        if server is not None:
            server.shutdown()
        for thread in threads:
            thread.join(timeout=5)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


corpus_app = command_group("The records stored in the device's corpus.")


@corpus_app.command("list")
def corpus_list(
    state_dir: StateDir,
    last: Annotated[int, typer.Option(help="The newest this many records (0: all).")] = 20,
    label: Annotated[str | None, typer.Option(help="Only records with this label.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Show stored records, newest first: id, when, label, source and the start of the text."""
    if last < 0:
        raise typer.BadParameter(f"--last must be 0 (all) or more, got {last}.")
    with open_store(state_dir) as store:
        records = [r for r in store.window() if label is None or r.label == label]
    newest = records[:last] if last else records
    if as_json:
        typer.echo(json_text([dataclasses.asdict(r) for r in newest]))
        return
    rows = [
        (r.id, f"{r.arrived_at:%Y-%m-%d %H:%M}", r.label or "-", r.source, _start(r.text)) for r in newest
    ]
    print_table(RECORD_COLUMNS, rows, f"{len(newest)} of {len(records)} stored")


RECORD_COLUMNS = (
    Column("id"),
    Column("arrived", drop=2),
    Column("label", wrap=True),
    Column("source", wrap=True, drop=1),
    Column("text", wrap=True),
)


@corpus_app.command("delete")
def corpus_delete(
    record_ids: Annotated[list[str], typer.Argument(help="The records' ids (see `corpus list`).")],
    state_dir: StateDir,
) -> None:
    """Delete stored records for good (a wrong label, text that should never have been taken in)."""
    with open_store(state_dir) as store:
        deleted = store.delete(record_ids)
    typer.echo(f"deleted {deleted} record{'s' if deleted != 1 else ''}")


@quarantine_app.command("list")
def quarantine_list(state_dir: StateDir, as_json: JsonOption = False) -> None:
    """Show quarantined records: id, when, why, and the start of the text."""
    with open_store(state_dir) as store:
        held = store.quarantined()
    if as_json:
        typer.echo(
            json_text([{**dataclasses.asdict(q.record), "reason": q.reason, "at": q.at} for q in held])
        )
        return
    rows = [
        (q.record.id, f"{q.at:%Y-%m-%d %H:%M}", q.record.source, q.reason, _start(q.record.text))
        for q in held
    ]
    print_table(QUARANTINE_COLUMNS, rows, f"{len(held)} quarantined")


QUARANTINE_COLUMNS = (
    Column("id"),
    Column("at", drop=2),
    Column("source", wrap=True, drop=1),
    Column("reason", wrap=True),
    Column("text", wrap=True, drop=3),
)


@quarantine_app.command("release")
def quarantine_release(
    record_id: QuarantinedId,
    state_dir: StateDir,
) -> None:
    """Accept a quarantined record as it is (a person overrides the rule); exact duplicates still count."""
    from fleetlora.client.corpus.pipeline import Pipeline

    with open_store(state_dir) as store:
        outcome = Pipeline(store).release(record_id)
    typer.echo(f"released {record_id}: {outcome.status}" + (f" ({outcome.reason})" if outcome.reason else ""))


@quarantine_app.command("drop")
def quarantine_drop(
    record_id: QuarantinedId,
    state_dir: StateDir,
) -> None:
    """Delete a quarantined record for good."""
    with open_store(state_dir) as store:
        store.drop(record_id)
    typer.echo(f"dropped {record_id}")


review_app = command_group("Records whose proposed labels a person should settle.")


def label(
    state_dir: StateDir,
    floor: Annotated[float, typer.Option(help="Confidence a proposal needs to become the label.")] = 0.8,
) -> None:
    """Let the device's current model (its active packaged adapter) label recent unlabelled records;
    unsure ones go to the review queue."""
    from fleetlora.client.corpus import labels
    from fleetlora.client.device_state import DeviceState
    from fleetlora.client.updates import UpdateSlots
    from fleetlora.common.model import cached_model

    slots = UpdateSlots(DeviceState(state_dir))
    active = slots.active()
    if active is None:
        raise typer.BadParameter("This device has no packaged adapter yet to label with (`device status`).")
    loaded = cached_model(active.spec)
    slots.load_into(loaded, active)
    with open_store(state_dir) as store:
        counts = labels.propose(store, labels.Labeller(loaded, f"model:v{active.version}"), floor=floor)
    typer.echo(", ".join(f"{n} {what}" for what, n in sorted(counts.items())) or "nothing to label")


@review_app.command("list")
def review_list(state_dir: StateDir, as_json: JsonOption = False) -> None:
    """Show records waiting for review with the models' proposals."""
    from fleetlora.client.corpus import labels

    with open_store(state_dir) as store:
        queue = labels.review_queue(store)
    proposals = {r.id: r.metadata[labels.REVIEW]["proposals"] for r in queue}
    if as_json:
        typer.echo(json_text([{"id": r.id, "text": r.text, "proposals": proposals[r.id]} for r in queue]))
        return
    rows = [
        (
            r.id,
            _start(r.text),
            ", ".join(f"{p['label']} {p['confidence']:.2f} ({p['by']})" for p in proposals[r.id]),
        )
        for r in queue
    ]
    print_table(REVIEW_COLUMNS, rows, f"{len(queue)} waiting for review")


REVIEW_COLUMNS = (Column("id"), Column("text", wrap=True, drop=1), Column("proposals", wrap=True))


def _start(text: str) -> str:
    """The first 60 characters of a record's text, on one line."""
    return " ".join(text.split())[:60]


@review_app.command("accept")
def review_accept(
    record_id: Annotated[str, typer.Argument(help="The record's id (see `review list`).")],
    state_dir: StateDir,
    label: Annotated[str | None, typer.Option(help="The right label, if not the top proposal.")] = None,
    new_label: Annotated[
        bool, typer.Option("--new-label", help="Allow a --label the fleet does not have yet.")
    ] = False,
) -> None:
    """Settle a record's label: the top proposal, or --label to correct it (one of the fleet's labels)."""
    from fleetlora.client.corpus import labels
    from fleetlora.client.device_state import DeviceState
    from fleetlora.client.updates import UpdateSlots

    active = UpdateSlots(DeviceState(state_dir)).active()  # its model's labels are the fleet's
    with open_store(state_dir) as store:
        chosen = labels.settle(
            store, record_id, label, known=active.spec.labels if active else (), new_label=new_label
        )
    typer.echo(f"{record_id}: {chosen} (by a person)")
