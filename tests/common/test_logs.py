"""Structured logs: JSON lines with their extra fields, daily rotation with retention, and their search.

Rotation is driven through TimedRotatingFileHandler's own rollover (no sleeping until midnight): each
test day's records are written with that day's timestamps, then the file is rolled over as at that
day's end, so the folder holds what a process running for those days would leave.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fleetlora.common.errors import ConfigError
from fleetlora.common.logs import (
    LOGGER,
    MAX_LINE_BYTES,
    ConsoleHandler,
    JsonLinesHandler,
    configure_json_logging,
    parse_since,
    search_logs,
)

DAY = timedelta(days=1)
START = datetime(2026, 11, 20, tzinfo=UTC)


@pytest.fixture(autouse=True)
def detached() -> Iterator[None]:
    """Each test's handlers leave the process's ``fleetlora`` logger as they found it."""
    logger = logging.getLogger(LOGGER)
    level = logger.level
    yield
    for handler in list(logger.handlers):
        if isinstance(handler, JsonLinesHandler | ConsoleHandler):
            logger.removeHandler(handler)
            handler.close()
    logger.setLevel(level)


def handler_of(path: Path) -> JsonLinesHandler:
    found = [
        h
        for h in logging.getLogger(LOGGER).handlers
        if isinstance(h, JsonLinesHandler) and h.baseFilename == str(path)
    ]
    assert len(found) == 1
    return found[0]


def emit(at: datetime, message: str, name: str = "fleetlora.test", **extra: object) -> None:
    """Log ``message`` as if at ``at``."""
    logger = logging.getLogger(name)
    record = logger.makeRecord(name, logging.INFO, __file__, 0, message, (), None, extra=extra)
    record.created = at.timestamp()
    logger.handle(record)


def end_day(handler: JsonLinesHandler, day: datetime) -> None:
    """Roll the file over as at the midnight (UTC) that ends ``day``."""
    handler.rolloverAt = int((day.replace(hour=0, minute=0) + DAY).timestamp())
    handler.doRollover()


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_record_is_one_json_line_with_its_extra_fields_made_json_safe(tmp_path: Path):
    path = configure_json_logging(tmp_path / "logs", "coordinator")
    assert path == tmp_path / "logs" / "coordinator.jsonl"
    at = datetime(2026, 11, 30, 10, 0, 0, 123000, tzinfo=UTC)
    emit(
        at,
        "round 7 completed",
        name="fleetlora.coordinator.rounds",  # the ServerApp's round lines reach the file
        event="round_phase",
        lineage="L1",
        round=7,
        version="v7",
        took=float("nan"),
        where=tmp_path,
        when=at,
        nested={"a": [1, (2, 3)], 4: b"xyz"},
    )
    logging.getLogger("fleetlora.test").debug("below the level: not written")
    logging.getLogger("elsewhere").warning("another library's record: not fleetlora's")
    [entry] = lines(path)
    assert entry == {
        "ts": "2026-11-30T10:00:00.123+00:00",
        "level": "INFO",
        "component": "coordinator",
        "logger": "fleetlora.coordinator.rounds",
        "message": "round 7 completed",
        "event": "round_phase",
        "lineage": "L1",
        "round": 7,
        "version": "v7",
        "took": "nan",
        "where": str(tmp_path),
        "when": at.isoformat(),
        "nested": {"a": [1, [2, 3]], "4": "<3 bytes>"},
    }


def test_private_attributes_another_librarys_record_factory_adds_are_not_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Ray, once imported, stamps ``_ray_timestamp_ns`` on every record; it is not an ``extra=`` field."""
    path = configure_json_logging(tmp_path, "coordinator")
    made = logging.getLogRecordFactory()

    def stamping(*args: object, **kwargs: object) -> logging.LogRecord:
        record = made(*args, **kwargs)
        record._library_timestamp_ns = 1796656407377904766
        return record

    monkeypatch.setattr(logging, "_logRecordFactory", stamping)  # restored after the test
    logging.getLogger("fleetlora.test").info("stamped", extra={"round": 3})
    [entry] = lines(path)
    assert entry["round"] == 3 and not any(key.startswith("_") for key in entry)


def test_an_exception_is_kept_in_the_entry(tmp_path: Path):
    path = configure_json_logging(tmp_path, "coordinator")
    try:
        raise RuntimeError("the terminator broke")
    except RuntimeError:
        logging.getLogger("fleetlora.coordinator.tls_terminator").exception("TLS terminator stopped")
    [entry] = lines(path)
    assert entry["level"] == "ERROR" and "RuntimeError: the terminator broke" in entry["exception"]


def test_configuring_twice_adds_no_second_handler_and_another_folder_moves_the_logs(tmp_path: Path):
    first = configure_json_logging(tmp_path / "a", "agent")
    configure_json_logging(tmp_path / "a", "agent")
    logging.getLogger("fleetlora.test").info("once")
    assert [e["message"] for e in lines(first)] == ["once"]
    second = configure_json_logging(tmp_path / "b", "agent")
    logging.getLogger("fleetlora.test").info("moved")
    assert [e["message"] for e in lines(first)] == ["once"]
    assert [e["message"] for e in lines(second)] == ["moved"]
    assert sum(isinstance(h, JsonLinesHandler) for h in logging.getLogger(LOGGER).handlers) == 1


@pytest.mark.parametrize(
    ("component", "retention"), [("Bad Name", 90), ("../up", 90), ("agent", 0), ("agent", 2.5)]
)
def test_a_bad_component_or_retention_is_a_clear_error(tmp_path: Path, component: str, retention):
    with pytest.raises(ConfigError):
        configure_json_logging(tmp_path, component, retention_days=retention)
    assert not list(tmp_path.iterdir())


def test_an_unwritable_folder_is_a_clear_error(tmp_path: Path):
    (tmp_path / "logs").write_text("a file where the folder should be")
    with pytest.raises(ConfigError, match="Cannot write logs"):
        configure_json_logging(tmp_path / "logs", "agent")


def test_daily_rotation_keeps_retention_days_files_and_deletes_the_oldest(tmp_path: Path):
    path = configure_json_logging(tmp_path, "agent", retention_days=3)
    handler = handler_of(path)
    for n in range(6):
        emit(START + n * DAY + timedelta(hours=12), f"day {n}")
        end_day(handler, START + n * DAY)
    emit(START + 6 * DAY, "today")
    rotated = sorted(p.name for p in tmp_path.iterdir() if p.name != "agent.jsonl")
    assert rotated == ["agent.jsonl.2026-11-23", "agent.jsonl.2026-11-24", "agent.jsonl.2026-11-25"]
    assert [e["message"] for e in lines(tmp_path / "agent.jsonl.2026-11-23")] == ["day 3"]
    # what is left, oldest first: the rotated days, then today's file
    assert [e["message"] for e in search_logs(tmp_path)] == ["day 3", "day 4", "day 5", "today"]


@pytest.fixture
def three_days(tmp_path: Path) -> Path:
    """Coordinator and rounds (ServerApp) logs over three days (two rotated), entries about two devices."""
    coordinator = handler_of(configure_json_logging(tmp_path, "coordinator"))
    for n in range(3):
        day = START + n * DAY
        emit(day + timedelta(hours=9), f"SuperLink ready, day {n}")
        emit(day + timedelta(hours=11), "package applied", device="kiosk-7", version=f"v{n + 5}")
        emit(day + timedelta(hours=11, minutes=5), "package refused", device="kiosk-70", reason="expired")
        if n < 2:
            end_day(coordinator, day)
    configure_json_logging(tmp_path, "rounds")  # the other process's file, in the same folder
    emit(START + timedelta(hours=10), "round 3 completed", lineage="L1", round=3, version="v7")
    emit(START + 2 * DAY + timedelta(hours=10), "round 4 failed", round=4, error="quorum not reached")
    return tmp_path


def messages(entries: Iterator[dict]) -> list[str]:
    return [e["message"] for e in entries]


def test_search_merges_components_and_days_oldest_first(three_days: Path):
    found = list(search_logs(three_days))
    assert [e["ts"] for e in found] == sorted(e["ts"] for e in found) and len(found) == 11
    assert messages(search_logs(three_days, component="rounds")) == [
        "round 3 completed",
        "round 4 failed",
    ]


def test_search_by_text_matches_message_and_field_values_case_insensitively(three_days: Path):
    assert messages(search_logs(three_days, "V7")) == ["round 3 completed", "package applied"]
    assert messages(search_logs(three_days, "QUORUM")) == ["round 4 failed"]
    assert messages(search_logs(three_days, "superlink ready")) == [
        f"SuperLink ready, day {n}" for n in range(3)
    ]
    assert list(search_logs(three_days, "nowhere to be found")) == []


def test_search_by_device_matches_the_device_field_exactly(three_days: Path):
    found = list(search_logs(three_days, device="kiosk-7"))
    assert [e["version"] for e in found] == ["v5", "v6", "v7"]
    assert messages(search_logs(three_days, "refused", device="kiosk-70")) == ["package refused"] * 3
    assert list(search_logs(three_days, device="None")) == []  # entries without a device do not match


def test_search_since_reads_rotated_files_from_that_day_on(three_days: Path):
    since = START + DAY + timedelta(hours=10)
    found = list(search_logs(three_days, since=since))
    assert found and all(datetime.fromisoformat(e["ts"]) >= since for e in found)
    assert messages(found)[:2] == ["package applied", "package refused"]  # day 1, 11:00 and 11:05
    naive = since.replace(tzinfo=None)  # a time without a zone is UTC
    assert list(search_logs(three_days, since=naive)) == found


def test_damaged_and_hostile_lines_are_skipped_and_the_search_goes_on(tmp_path: Path):
    good = {"ts": "2026-11-30T10:00:00.000+00:00", "message": "kept", "device": "d1"}
    huge = {"ts": "2026-11-30T10:00:00.000+00:00", "message": "x" * (MAX_LINE_BYTES + 10), "device": "d1"}
    damaged = [
        b"not json at all",
        b'{"ts": "2026-11-30T10:00:00',  # cut short
        b"[1, 2, 3]",
        b'"a string"',
        b"\xff\xfe invalid utf-8",
        b"[" * 100_000 + b"]" * 100_000,  # nested past the parser's depth
        json.dumps(huge).encode(),
        b"x" * (3 * MAX_LINE_BYTES),  # no newline for megabytes: read in bounded pieces
        b'{"ts": 5, "message": "kept too", "device": "d1"}',  # a bad time only matters with --since
    ]
    (tmp_path / "agent.jsonl.2026-11-29").write_bytes(
        b"\n".join([*damaged, json.dumps(good).encode()]) + b"\n"
    )
    (tmp_path / "agent.jsonl").write_bytes(
        b"\n".join([json.dumps(good).encode(), b"x" * (MAX_LINE_BYTES + 1)])
    )
    (tmp_path / "notes.txt").write_text('{"message": "not a log file"}\n')
    assert messages(search_logs(tmp_path)) == ["kept too", "kept", "kept"]
    assert messages(search_logs(tmp_path, since=datetime(2026, 11, 1, tzinfo=UTC))) == ["kept", "kept"]
    assert messages(search_logs(tmp_path, "KEPT", device="d1")) == ["kept too", "kept", "kept"]


def test_a_line_of_exactly_the_limit_is_read(tmp_path: Path):
    entry = {"message": "edge", "pad": ""}
    entry["pad"] = "p" * (MAX_LINE_BYTES - len(json.dumps(entry)))
    line = json.dumps(entry).encode()
    assert len(line) == MAX_LINE_BYTES
    (tmp_path / "agent.jsonl").write_bytes(line + b"\n" + json.dumps({"message": "next"}).encode() + b"\n")
    assert messages(search_logs(tmp_path)) == ["edge", "next"]


def test_a_symlinked_log_file_is_not_followed(tmp_path: Path):
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"message": "outside the log folder"}\n')
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "agent.jsonl").symlink_to(secret)
    assert list(search_logs(logs)) == []


def test_searching_a_missing_folder_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="No log folder"):
        list(search_logs(tmp_path / "nothing"))


def test_since_takes_an_age_or_an_iso_time():
    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    assert parse_since("30m", now) == now - timedelta(minutes=30)
    assert parse_since("2h", now) == now - timedelta(hours=2)
    assert parse_since("3d", now) == now - timedelta(days=3)
    assert parse_since("2026-11-30T10:00") == datetime(2026, 11, 30, 10, 0, tzinfo=UTC)
    assert parse_since("2026-11-30T10:00+02:00") == datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
    for bad in (
        "yesterday", "2w", "-3d", "", "999999d", "99999999d", "2026-13-01",
        "0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00",  # past year 1 or 9999 in UTC
    ):  # fmt: skip
        with pytest.raises(ConfigError, match="--since"):
            parse_since(bad, now)


def test_non_finite_floats_never_make_invalid_json(tmp_path: Path):
    path = configure_json_logging(tmp_path, "agent")
    emit(START, "values", inf=math.inf, items=[math.nan, 1.5])
    [entry] = lines(path)
    assert (entry["inf"], entry["items"]) == ("inf", ["nan", 1.5])
