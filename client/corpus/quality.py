"""Quality filter: the reasons a record goes to the quarantine table instead of the corpus.

Rule-based checks (:func:`check` with :class:`QualityRules`): empty, too short or too long, broken
encoding, a character repeated many times, too few letters (binary or symbol garbage), letters
mostly from a script the device does not expect (wrong language or charset). Model-based checks
take a model's output and never load a model here: :func:`low_confidence` (the top class
probability under a floor) and :class:`ConflictDetector` (a near-identical text already carries
another label).

Every check answers None when the record passes, else one line ``"<code>: <detail>"`` whose code
(:func:`reason_code`) is one of :data:`REASON_CODES`, e.g. ``"too-short: 2 < 3 chars"`` or
``"wrong-charset: 80% Cyrillic letters (allowed: Latin)"``.
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from fleetlora.client.corpus.dedup import DEFAULT_THRESHOLD, Deduplicator
from fleetlora.client.corpus.records import Record
from fleetlora.common.errors import ConfigError

REASON_CODES = (
    "empty",
    "too-short",
    "too-long",
    "bad-encoding",
    "repeated-characters",
    "too-few-letters",
    "wrong-charset",
    "low-confidence",
    "conflicting-labels",
)


def reason_code(reason: str) -> str:
    """The code of a reason line (the part before the first colon)."""
    return reason.split(":", 1)[0]


# ---- scripts ----------------------------------------------------------------------------------

# Unicode names whose first word qualifies the script rather than naming it ("OLD ITALIC LETTER A").
_QUALIFIERS = frozenset({"OLD", "LINEAR", "CANADIAN", "TAI", "NEW", "INSCRIPTIONAL", "CAUCASIAN", "PSALTER"})
# Letters whose name starts with something other than their script.
_FIXUPS = {"IDEOGRAPHIC": "CJK", "HENTAIGANA": "HIRAGANA", "ROMAN": "LATIN", "TURNED": "LATIN"}
_ALIASES = {
    "HAN": ("CJK",),
    "KANJI": ("CJK",),
    "HANZI": ("CJK",),
    "CHINESE": ("CJK",),
    "JAPANESE": ("CJK", "HIRAGANA", "KATAKANA"),
    "KOREAN": ("HANGUL", "CJK"),
}
_COMMON_SCRIPTS = frozenset(
    {
        "LATIN", "CYRILLIC", "GREEK", "ARABIC", "HEBREW", "CJK", "HIRAGANA", "KATAKANA", "HANGUL",
        "DEVANAGARI", "BENGALI", "TAMIL", "TELUGU", "GUJARATI", "GURMUKHI", "KANNADA", "MALAYALAM",
        "THAI", "LAO", "GEORGIAN", "ARMENIAN", "ETHIOPIC", "KHMER", "MYANMAR", "SINHALA", "TIBETAN",
    }
)  # fmt: skip


def script_of(letter: str) -> str | None:
    """The script of one character, or None when it is not a letter.

    The heuristic: a letter is a character of Unicode category ``Lu``, ``Ll``, ``Lt`` or ``Lo``
    (modifier letters ``Lm`` such as ``ʼ`` count as no script); its script is the first word of its
    Unicode name — ``LATIN SMALL LETTER E WITH ACUTE`` → LATIN, ``CYRILLIC CAPITAL LETTER ZHE`` →
    CYRILLIC, ``CJK UNIFIED IDEOGRAPH-4E2D`` → CJK, ``HANGUL SYLLABLE GA`` → HANGUL — or the first two
    words after a qualifier (``OLD ITALIC``, ``CANADIAN SYLLABICS``), with a few fix-ups
    (``IDEOGRAPHIC CLOSING MARK`` → CJK, ``ROMAN NUMERAL REVERSED ONE HUNDRED`` → LATIN). Callers
    pass NFKC-normalised text, so fullwidth and mathematical letters count as their base script.
    This follows Unicode's naming convention, not the Scripts.txt property (which the standard
    library lacks); the two agree for the letters of every living script.
    """
    return _script(letter)


@lru_cache(maxsize=4096)
def _script(letter: str) -> str | None:
    if unicodedata.category(letter) not in ("Lu", "Ll", "Lt", "Lo"):
        return None
    words = unicodedata.name(letter, "UNKNOWN").split()
    if words[0] in _QUALIFIERS and len(words) > 1:
        return f"{words[0]} {words[1]}"
    return _FIXUPS.get(words[0], words[0])


@lru_cache(maxsize=1)
def known_scripts() -> frozenset[str]:
    """Every script name :func:`script_of` can answer (a scan of all code points, ~0.5 s, once)."""
    found = set()
    for code in range(0x110000):
        char = chr(code)
        if unicodedata.category(char)[0] != "L":
            continue
        for letter in unicodedata.normalize("NFKC", char):
            script = _script.__wrapped__(letter)
            if script is not None:
                found.add(script)
    return frozenset(found)


def _script_keys(name: object) -> tuple[str, ...]:
    key = " ".join(str(name).upper().replace("_", " ").split())
    return _ALIASES.get(key, (key,))


def _display(script: str) -> str:
    return script if script == "CJK" else script.title()


# ---- rules ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QualityRules:
    """The rule-based checks' settings; out-of-range values raise :class:`ConfigError`.

    ``min_chars`` / ``max_chars``: bounds on the trimmed text's length in characters.
    ``max_repeated_run``: the longest run of one non-space character allowed ("sooooo" is a
    run of 5; "1111 1111" two runs of 4).
    ``min_letter_share``: the least share of letters among non-space characters (a card number,
    base64 or binary garbage has few). ``allowed_scripts``: the scripts a device expects (names as
    :func:`script_of` gives them, case-insensitive; "Han" means CJK, "Japanese" CJK, Hiragana and
    Katakana, "Korean" Hangul and CJK); a text whose letters are more
    than ``max_foreign_share`` from other scripts is ``wrong-charset``. ``max_invalid_chars``: how
    many U+FFFD replacement characters, control characters (other than tab and newlines), lone
    surrogates or private-use characters a text may hold, the traces of a wrong decoding.
    """

    min_chars: int = 3
    max_chars: int = 2000
    max_repeated_run: int = 10
    min_letter_share: float = 0.5
    allowed_scripts: frozenset[str] = field(default_factory=lambda: frozenset({"LATIN"}))
    max_foreign_share: float = 0.5
    max_invalid_chars: int = 0

    def __post_init__(self) -> None:
        def whole(name: str, value: object, low: int) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"quality rule {name} must be an integer >= {low}; got {value!r}")
            return value

        def share(name: str, value: object, low_open: bool) -> float:
            bounds = "(0, 1]" if low_open else "[0, 1]"
            problem = ConfigError(f"quality rule {name} must be a share in {bounds}; got {value!r}")
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise problem
            if not (0 < value <= 1 if low_open else 0 <= value <= 1):
                raise problem
            return float(value)

        whole("min_chars", self.min_chars, 1)
        whole("max_chars", self.max_chars, 1)
        if self.max_chars < self.min_chars:
            raise ConfigError(
                f"quality rule max_chars ({self.max_chars}) must be >= min_chars ({self.min_chars})"
            )
        whole("max_repeated_run", self.max_repeated_run, 2)
        whole("max_invalid_chars", self.max_invalid_chars, 0)
        object.__setattr__(self, "min_letter_share", share("min_letter_share", self.min_letter_share, False))
        object.__setattr__(
            self, "max_foreign_share", share("max_foreign_share", self.max_foreign_share, False)
        )
        scripts = self.allowed_scripts
        if isinstance(scripts, str) or not isinstance(scripts, Iterable):
            raise ConfigError(
                f"quality rule allowed_scripts must be a set of script names such as {{'LATIN'}}; "
                f"got {scripts!r}"
            )
        keys = frozenset(key for name in scripts for key in _script_keys(name))
        if not keys:
            raise ConfigError("quality rule allowed_scripts must name at least one script, e.g. {'LATIN'}")
        unknown = sorted(k for k in keys if k not in _COMMON_SCRIPTS and k not in known_scripts())
        if unknown:
            raise ConfigError(
                f"quality rule allowed_scripts: unknown script(s) {', '.join(unknown)}; use Unicode "
                f"script names such as LATIN, CYRILLIC, GREEK, ARABIC, CJK, HIRAGANA, HANGUL"
            )
        object.__setattr__(self, "allowed_scripts", keys)


DEFAULT_RULES = QualityRules()


def _invalid(ch: str) -> bool:
    if ch == "\ufffd":
        return True
    category = unicodedata.category(ch)
    if category == "Cc":
        return ch not in "\t\n\r\x0b\x0c"
    return category in ("Cs", "Co")


def _longest_run(text: str) -> tuple[int, str]:
    best, best_ch, run, prev = 0, "", 0, ""
    for ch in text:
        run = run + 1 if ch == prev else 1
        prev = ch
        if run > best and not ch.isspace():
            best, best_ch = run, ch
    return best, best_ch


def check(record: Record, rules: QualityRules = DEFAULT_RULES) -> str | None:
    """The first rule the record breaks, as ``"<code>: <detail>"``, or None when it passes.

    The rules run in the order empty, too-short, too-long, bad-encoding, repeated-characters,
    too-few-letters, wrong-charset. Image and audio records (whose text is a file path) skip them.
    """
    if record.modality != "text":
        return None
    text = record.text.strip()
    if not text:
        return "empty"
    n = len(text)
    if n < rules.min_chars:
        return f"too-short: {n} < {rules.min_chars} chars"
    if n > rules.max_chars:
        return f"too-long: {n} > {rules.max_chars} chars"
    invalid = sum(_invalid(ch) for ch in text)
    if invalid > rules.max_invalid_chars:
        return (
            f"bad-encoding: {invalid} replacement/control character{'s' * (invalid != 1)} "
            f"> {rules.max_invalid_chars}"
        )
    run, ch = _longest_run(text)
    if run > rules.max_repeated_run:
        return f"repeated-characters: {run} × {ch!r}"
    folded = unicodedata.normalize("NFKC", text)
    visible = [c for c in folded if not c.isspace()]
    scripts = Counter(s for s in map(_script, visible) if s is not None)
    letters = sum(scripts.values())
    letter_share = letters / len(visible) if visible else 0.0
    if letter_share < rules.min_letter_share:
        return f"too-few-letters: {letter_share:.0%} of non-space characters < {rules.min_letter_share:.0%}"
    if letters:
        foreign = Counter({s: c for s, c in scripts.items() if s not in rules.allowed_scripts})
        foreign_share = sum(foreign.values()) / letters
        if foreign_share > rules.max_foreign_share:
            named = ", ".join(f"{c / letters:.0%} {_display(s)}" for s, c in foreign.most_common(2))
            allowed = ", ".join(sorted(map(_display, rules.allowed_scripts)))
            return f"wrong-charset: {named} letters (allowed: {allowed})"
    return None


# ---- model-based checks -----------------------------------------------------------------------


def low_confidence(probabilities: Sequence[float] | Mapping[str, float], floor: float) -> str | None:
    """``"low-confidence: ..."`` when the model's top class probability is below ``floor``, else None.

    ``probabilities`` is one record's class distribution (softmax output), as a sequence (classes by
    index) or a mapping from label to probability; it must be non-empty, each value in [0, 1],
    summing to 1 within 1e-3 (logits are refused). ``floor`` must be in (0, 1).
    """
    if isinstance(floor, bool) or not isinstance(floor, int | float) or not 0 < floor < 1:
        raise ConfigError(f"low-confidence floor must be a probability in (0, 1); got {floor!r}")
    if isinstance(probabilities, Mapping):
        names: list[str] | None = [str(k) for k in probabilities]
        values = [float(v) for v in probabilities.values()]
    else:
        names = None
        values = [float(v) for v in probabilities]
    if not values:
        raise ValueError("low_confidence needs at least one class probability; got none")
    if not all(math.isfinite(v) and 0 <= v <= 1 for v in values) or abs(sum(values) - 1) > 1e-3:
        raise ValueError(
            f"low_confidence expects probabilities in [0, 1] summing to 1 (softmax output, not logits); "
            f"got {len(values)} values summing to {sum(values):.4g}"
        )
    top = max(range(len(values)), key=values.__getitem__)
    if values[top] >= floor:
        return None
    which = repr(names[top]) if names is not None else f"#{top}"
    return f"low-confidence: top class {which} at {values[top]:.2f} < {floor:.2f}"


class ConflictDetector:
    """Finds labelled records whose near-identical (or identical) text already carries another label.

    It uses a :class:`~fleetlora.client.corpus.dedup.Deduplicator`'s matches: pass the ingest
    pipeline's own one to share its index (then :meth:`add` only indexes records it lacks and
    :meth:`forget` leaves the index alone), or let the detector make one at ``threshold``. Labels
    are remembered for records given to :meth:`add` or :meth:`set_label` (about 0.2 KiB each).

    In an ingest loop, call :meth:`check` before dropping a near-duplicate: a copy that agrees is a
    duplicate, one that disagrees is a conflict for the quarantine table.
    """

    def __init__(
        self, deduplicator: Deduplicator | None = None, threshold: float = DEFAULT_THRESHOLD
    ) -> None:
        self._owns_index = deduplicator is None
        self.deduplicator = deduplicator if deduplicator is not None else Deduplicator(threshold=threshold)
        self._labels: dict[str, str] = {}

    @classmethod
    def from_records(
        cls,
        records: Iterable[Record],
        deduplicator: Deduplicator | None = None,
        threshold: float = DEFAULT_THRESHOLD,
    ) -> ConflictDetector:
        """A detector that knows ``records`` (a device's store, after a restart)."""
        detector = cls(deduplicator, threshold)
        for record in records:
            detector.add(record)
        return detector

    def add(self, record: Record) -> None:
        """Remember a kept record's label (if it has one) and index it if the index lacks it."""
        if record.id not in self.deduplicator:
            self.deduplicator.add(record)
        if record.label is not None:
            self._labels[record.id] = record.label

    def set_label(self, record_id: str, label: str | None) -> None:
        """Record (or clear) a label that arrived later, e.g. from the labelling stage."""
        if label is None:
            self._labels.pop(record_id, None)
        else:
            self._labels[record_id] = label

    def forget(self, record_id: str) -> None:
        """Drop an evicted record (from the index too when the detector made its own)."""
        self._labels.pop(record_id, None)
        if self._owns_index:
            self.deduplicator.forget(record_id)

    def check(self, record: Record) -> str | None:
        """``"conflicting-labels: ..."`` for the most similar known record with another label, else
        None (also None for an unlabelled record)."""
        if record.label is None:
            return None
        for match in self.deduplicator.matches(record):
            other = self._labels.get(match.match_id or "")
            if other is None or other == record.label:
                continue
            what = "an identical" if match.kind == "exact" else f"a {match.similarity:.2f}-similar"
            return f"conflicting-labels: {record.label!r} vs {other!r} for {what} record {match.match_id}"
        return None
