"""Quality rules, script detection, low confidence and conflicting labels."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest

from fleetlora.client.corpus.dedup import Deduplicator
from fleetlora.client.corpus.quality import (
    DEFAULT_RULES,
    REASON_CODES,
    ConflictDetector,
    QualityRules,
    check,
    known_scripts,
    low_confidence,
    reason_code,
    script_of,
)
from fleetlora.client.corpus.records import Record
from fleetlora.common.errors import ConfigError

BANKING77 = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "banking77" / "train.csv"

NORMAL = "I am still waiting on my card?"


def rec(text: str, label: str | None = None, rid: str | None = None, **kwargs: object) -> Record:
    extra = {"id": rid} if rid is not None else {}
    return Record(text=text, source="test", device="dev", label=label, **extra, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def banking_rows() -> list[dict[str, str]]:
    if not BANKING77.exists():
        pytest.skip(f"BANKING77 not at {BANKING77}")
    with BANKING77.open(newline="") as f:
        return list(csv.DictReader(f))


# ---- rules ------------------------------------------------------------------------------------


def test_a_normal_sentence_passes() -> None:
    assert check(rec(NORMAL)) is None
    assert check(rec("Soooo happy with the café's new card, merci! 👍")) is None


def test_every_banking77_training_text_passes_the_defaults(banking_rows: list[dict[str, str]]) -> None:
    failures = Counter(reason_code(r) for row in banking_rows if (r := check(rec(row["text"]))))
    assert not failures, failures


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("  \n\t ", "empty"),
        ("hi", "too-short: 2 < 3 chars"),
        (" ok ", "too-short: 2 < 3 chars"),
        ("x" * 5 + " word" * 500, "too-long: 2505 > 2000 chars"),
        ("my card\x00\x01 is lost", "bad-encoding: 2 replacement/control characters > 0"),
        ("where is my caf\ufffd card", "bad-encoding: 1 replacement/control character > 0"),
        ("a" * 40, "repeated-characters: 40 × 'a'"),
        ("help me!!!!!!!!!!!!!!!!!!", "repeated-characters: 18 × '!'"),
        ("4111 1111 1111 1111", "too-few-letters: 0% of non-space characters < 50%"),
        ("call me: 0000000000000", "repeated-characters: 13 × '0'"),
        ("#$%^ &*() <<>> ab", "too-few-letters: 14% of non-space characters < 50%"),
        ("Привет, где моя карта?", "wrong-charset: 100% Cyrillic letters (allowed: Latin)"),
        ("Γεια σου, πού είναι η κάρτα μου;", "wrong-charset: 100% Greek letters (allowed: Latin)"),
        ("我的银行卡在哪里？", "wrong-charset: 100% CJK letters (allowed: Latin)"),
        ("カードはどこですか", "wrong-charset: 75% Hiragana, 25% Katakana letters (allowed: Latin)"),
        ("My card карта где где где", "wrong-charset: 70% Cyrillic letters (allowed: Latin)"),
    ],
)
def test_each_rule_triggers_with_its_reason(text: str, reason: str) -> None:
    assert check(rec(text)) == reason
    assert reason_code(reason) in REASON_CODES


def test_rules_are_configurable() -> None:
    strict = QualityRules(min_chars=10, max_chars=20, max_repeated_run=3, min_letter_share=0.9)
    assert check(rec("card lost"), strict) == "too-short: 9 < 10 chars"
    assert check(rec("my card was lost in the ATM"), strict) == "too-long: 27 > 20 chars"
    assert check(rec("sooooo lost"), strict) == "repeated-characters: 5 × 'o'"
    assert check(rec("card 1234 lost"), strict) == "too-few-letters: 67% of non-space characters < 90%"
    assert check(rec("sooooo lost")) is None  # the default allows a run of 10
    lenient = QualityRules(max_invalid_chars=2)
    assert check(rec("my card\x00 is lost"), lenient) is None


def test_a_few_foreign_letters_pass() -> None:
    assert check(rec("I paid 20€ at Café Müller in Zürich, but the app shows Ω and µ")) is None
    assert check(rec("Transfer to Андрей failed, why did my transfer fail?")) is None


@pytest.mark.parametrize(
    ("text", "allowed"),
    [
        ("Привет, где моя карта?", {"LATIN", "CYRILLIC"}),
        ("Γεια σου, πού είναι η κάρτα μου;", {"greek"}),
        ("我的银行卡在哪里？", {"Han"}),
        ("我的银行卡在哪里？", {"CJK"}),
        ("カードはどこですか", {"Japanese"}),
        ("카드가 어디 있나요", {"korean"}),
    ],
)
def test_other_scripts_accepted_when_allowed(text: str, allowed: set[str]) -> None:
    assert check(rec(text)) is not None
    assert check(rec(text), QualityRules(allowed_scripts=frozenset(allowed))) is None


def test_fullwidth_letters_count_as_latin() -> None:
    assert check(rec("ｗｈｅｒｅ ｉｓ ｍｙ ｃａｒｄ")) is None


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_media_records_skip_text_rules(modality: str) -> None:
    assert check(rec("x", modality=modality)) is None
    assert check(rec("/inbox/фото.jpg", modality=modality)) is None


def test_script_of() -> None:
    assert script_of("é") == "LATIN"
    assert script_of("Ж") == "CYRILLIC"
    assert script_of("λ") == "GREEK"
    assert script_of("中") == "CJK"
    assert script_of("한") == "HANGUL"
    assert script_of("ا") == "ARABIC"
    assert script_of("𐌰") == "GOTHIC"
    assert script_of("𐌀") == "OLD ITALIC"
    assert script_of("1") is None
    assert script_of("ʼ") is None  # a modifier letter
    assert {"LATIN", "CYRILLIC", "GREEK", "CJK", "HIRAGANA", "HANGUL", "ARABIC"} <= known_scripts()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_chars": 0}, "min_chars must be an integer >= 1"),
        ({"min_chars": 2.5}, "min_chars must be an integer"),
        ({"min_chars": 10, "max_chars": 5}, r"max_chars \(5\) must be >= min_chars \(10\)"),
        ({"max_repeated_run": 1}, "max_repeated_run must be an integer >= 2"),
        ({"min_letter_share": 1.5}, r"min_letter_share must be a share in \[0, 1\]"),
        ({"min_letter_share": float("nan")}, "min_letter_share"),
        ({"max_foreign_share": -0.1}, "max_foreign_share"),
        ({"max_invalid_chars": -1}, "max_invalid_chars"),
        ({"allowed_scripts": "LATIN"}, "allowed_scripts must be a set of script names"),
        ({"allowed_scripts": frozenset()}, "must name at least one script"),
        ({"allowed_scripts": frozenset({"LATIN", "KLINGON"})}, "unknown script.*KLINGON"),
    ],
)
def test_bad_rules_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        QualityRules(**kwargs)  # type: ignore[arg-type]


def test_rules_normalise_script_names() -> None:
    rules = QualityRules(allowed_scripts=frozenset({"latin", "Old Italic", "Han"}))
    assert rules.allowed_scripts == frozenset({"LATIN", "OLD ITALIC", "CJK"})
    assert DEFAULT_RULES.allowed_scripts == frozenset({"LATIN"})


# ---- low confidence ---------------------------------------------------------------------------


def test_low_confidence() -> None:
    assert low_confidence([0.2, 0.25, 0.3, 0.25], floor=0.5) == "low-confidence: top class #2 at 0.30 < 0.50"
    assert low_confidence({"card_arrival": 0.45, "lost_card": 0.55}, floor=0.6) == (
        "low-confidence: top class 'lost_card' at 0.55 < 0.60"
    )
    assert low_confidence([0.1, 0.9], floor=0.5) is None
    assert low_confidence([0.5, 0.5], floor=0.5) is None  # at the floor passes
    assert low_confidence([1.0], floor=0.99) is None


@pytest.mark.parametrize("floor", [0, 1, 1.5, -0.2, True])
def test_low_confidence_refuses_bad_floor(floor: float) -> None:
    with pytest.raises(ConfigError, match=r"floor must be a probability in \(0, 1\)"):
        low_confidence([0.5, 0.5], floor)


@pytest.mark.parametrize("probabilities", [[], [2.0, -1.0], [0.2, 0.2], [float("nan"), 1.0]])
def test_low_confidence_refuses_non_probabilities(probabilities: list[float]) -> None:
    with pytest.raises(ValueError, match="probabilit"):
        low_confidence(probabilities, 0.5)


# ---- conflicting labels -----------------------------------------------------------------------


def test_conflicting_labels_for_a_near_identical_text() -> None:
    detector = ConflictDetector(threshold=0.9)
    detector.add(rec("I transferred some money but it hasn't arrived.", "transfer_not_received", "a"))
    reason = detector.check(rec("I transferred some money but it hasn't arrived yet", "balance_not_updated"))
    assert reason is not None
    assert reason.startswith("conflicting-labels: 'balance_not_updated' vs 'transfer_not_received' for a 0.9")
    assert reason.endswith("-similar record a")
    assert reason_code(reason) in REASON_CODES
    assert (
        detector.check(rec("I transferred some money but it hasn't arrived yet", "transfer_not_received"))
        is None
    )
    assert detector.check(rec("I transferred some money but it hasn't arrived yet")) is None  # unlabelled
    assert detector.check(rec("How do I top up my card?", "top_up")) is None  # nothing similar


def test_conflicting_labels_for_an_identical_text() -> None:
    detector = ConflictDetector.from_records([rec("Has my top-up gone through?", "top_up_reverted", "a")])
    assert detector.check(rec("Has my top-up gone through?", "pending_top_up")) == (
        "conflicting-labels: 'pending_top_up' vs 'top_up_reverted' for an identical record a"
    )
    # the same request spelled "top up": identical after normalisation, similarity 1.00
    assert detector.check(rec("Has my top up gone through?", "pending_top_up")) == (
        "conflicting-labels: 'pending_top_up' vs 'top_up_reverted' for a 1.00-similar record a"
    )


def test_conflicts_skip_agreeing_and_unlabelled_matches() -> None:
    dedup = Deduplicator(0.9)
    dedup.add(rec("Where is my new card?", None, "unlabelled"))  # indexed by the pipeline, no label
    detector = ConflictDetector(dedup)
    detector.add(rec("where is my new card", "card_arrival", "agrees"))
    detector.add(rec("Where is my new card!", "card_delivery", "disagrees"))
    assert len(dedup) == 3
    reason = detector.check(rec("Where is my new card?", "card_arrival"))
    assert reason is not None and "'card_arrival' vs 'card_delivery'" in reason and "disagrees" in reason


def test_set_label_and_forget() -> None:
    dedup = Deduplicator(0.9)
    detector = ConflictDetector(dedup)
    detector.add(rec("Can I get a disposable virtual card?", None, "a"))
    probe = rec("Can I get a disposable virtual card", "disposable_card")
    assert detector.check(probe) is None
    detector.set_label("a", "virtual_card")
    assert detector.check(probe) is not None
    detector.set_label("a", None)
    assert detector.check(probe) is None
    detector.set_label("a", "virtual_card")
    detector.forget("a")
    assert detector.check(probe) is None
    assert "a" in dedup  # a shared index is the pipeline's to evict
    own = ConflictDetector()
    own.add(rec("Can I get a disposable virtual card?", "virtual_card", "b"))
    own.forget("b")
    assert "b" not in own.deduplicator


def test_conflicts_in_banking77(banking_rows: list[dict[str, str]]) -> None:
    """Streaming BANKING77 train through the detector finds its own label noise."""
    detector = ConflictDetector(threshold=0.9)
    conflicts = []
    for i, row in enumerate(banking_rows):
        record = rec(row["text"], row["category"], f"r{i}")
        reason = detector.check(record)
        if reason:
            conflicts.append((row["text"], reason))
        elif detector.deduplicator.check(record).kind == "new":
            detector.add(record)
    print(f"BANKING77 train: {len(conflicts)} conflicting labels at 0.9", *conflicts, sep="\n  ")
    texts = {text for text, _ in conflicts}
    assert "I transferred some money but it hasn't arrived yet" in texts
    assert 1 <= len(conflicts) <= 10
