"""De-duplication of arriving records: exact (content hash) and near-duplicate (MinHash LSH).

A :class:`Deduplicator` answers, for each arriving :class:`~fleetlora.client.corpus.records.Record`,
whether it is ``new``, an ``exact`` duplicate (the same content hash as an indexed record) or a
``near`` duplicate (a text whose estimated Jaccard similarity to an indexed text is at least the
threshold). Kept records are indexed with :meth:`Deduplicator.add`, evicted ones removed with
:meth:`Deduplicator.forget`, and a restarted device rebuilds the index from its store with
:meth:`Deduplicator.from_records`.

Near-duplicate detection uses ``datasketch``'s :class:`~datasketch.MinHash` (scheme ``affine32``)
and :class:`~datasketch.MinHashLSH`. The threshold is limited to [0.85, 0.95]: below 0.85 short
texts that differ in meaning start to match, above 0.95 only re-punctuated copies do.

For benchmarks (``benchmarks/corpus.py``), :func:`injected_near_duplicates` builds a labelled set
of mutually distinct originals plus near-duplicates made by small edits, and :func:`score` measures
a threshold's precision and recall on it.
"""

from __future__ import annotations

import random
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from datasketch import MinHash, MinHashLSH

from fleetlora.client.corpus.records import Record, content_hash
from fleetlora.common.errors import ConfigError

MIN_THRESHOLD = 0.85
MAX_THRESHOLD = 0.95
DEFAULT_THRESHOLD = 0.9

# LSH banding: every pair whose true Jaccard is CANDIDATE_MARGIN below the threshold must still
# become a candidate with probability >= CANDIDATE_RECALL; the estimate then decides.
CANDIDATE_MARGIN = 0.05
CANDIDATE_RECALL = 0.99

_SCHEME = "affine32"

VerdictKind = Literal["new", "exact", "near"]


@dataclass(frozen=True)
class Verdict:
    """What :meth:`Deduplicator.check` decided about one record.

    ``match_id`` is the indexed record it duplicates and ``similarity`` the estimated Jaccard
    similarity of their normalised texts (1.0 for an exact duplicate); both are None for ``new``.
    """

    kind: VerdictKind
    match_id: str | None = None
    similarity: float | None = None

    @property
    def is_duplicate(self) -> bool:
        return self.kind != "new"

    @property
    def reason(self) -> str | None:
        """A one-line reason for a quarantine table or a log, None for a new record."""
        if self.kind == "exact":
            return f"exact-duplicate: same content hash as record {self.match_id}"
        if self.kind == "near":
            return f"near-duplicate: {self.similarity:.2f}-similar to record {self.match_id}"
        return None


NEW = Verdict("new")


_APOSTROPHES = frozenset("'’‘ʼ`´")


def normalise(text: str) -> str:
    """The text as shingling sees it: NFKC, case-folded, apostrophes and zero-width characters
    removed (``can't`` = ``cant``), other punctuation and control characters turned into spaces
    (``top-up`` = ``top up``), every run of whitespace one space, trimmed."""
    out: list[str] = []
    for ch in unicodedata.normalize("NFKC", text).casefold():
        if ch in _APOSTROPHES:
            continue
        category = unicodedata.category(ch)
        if category == "Cf":  # zero-width characters, soft hyphens: inside words
            continue
        separator = category[0] in "PZ" or category in ("Cc", "Co", "Cn", "Cs") or ch.isspace()
        out.append(" " if separator else ch)
    return " ".join("".join(out).split())


def shingles(text: str, size: int = 3) -> set[str]:
    """The character ``size``-grams of the normalised text (spaces included, so grams that span a
    word boundary keep word order); a normalised text shorter than ``size`` is its own single
    shingle, an empty one has none."""
    norm = normalise(text)
    if len(norm) <= size:
        return {norm} if norm else set()
    return {norm[i : i + size] for i in range(len(norm) - size + 1)}


def _candidate_probability(similarity: float, bands: int, rows: int) -> float:
    return 1.0 - (1.0 - similarity**rows) ** bands


def band_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) for the LSH index: the most rows per band (fewest useless candidates) such
    that a pair whose true Jaccard is ``threshold - CANDIDATE_MARGIN`` is still a candidate with
    probability >= ``CANDIDATE_RECALL``.

    ``datasketch``'s own optimiser weighs false positives and negatives equally, which at 0.9 and
    128 permutations gives 5 bands × 25 rows: a pair with Jaccard exactly 0.9 is then a candidate
    only 31% of the time. Candidates are cheap to verify (one vector comparison), missed pairs are
    lost for good, so the banding here leans to recall: 16 × 8 at 0.9 (a 0.85 pair: 99.4%, a 0.5
    pair: 6%), 21 × 6 at 0.85, 12 × 10 at 0.95.
    """
    target = max(threshold - CANDIDATE_MARGIN, 0.0)
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if _candidate_probability(target, bands, rows) >= CANDIDATE_RECALL:
            return bands, rows
    return num_perm, 1


class Deduplicator:
    """Exact and near-duplicate index over the records a device keeps.

    Shingles are character 3-grams of the normalised text. Intent texts such as BANKING77's are
    short (median ~60 characters, ~12 words), so a small edit moves a large share of any text's
    shingles. Measured on BANKING77 (exact Jaccard, 400 sentences, one random edit each), a
    one-character typo keeps Jaccard >= 0.85 for 67% of sentences with character 3-grams, 56% with
    4-grams, 53% with 5-grams, 49% with word unigrams and 43% with word bigrams; a dropped or
    inserted word 62-68% with 3-grams against 18-25% with word bigrams (word unigrams do better on
    dropped words but ignore word order and miss typos). Character 2-grams catch more typos
    (recall 0.89 against 0.80 at 0.9 on :func:`injected_near_duplicates` with 2000 originals), but
    they also match different requests: streaming all of BANKING77 train at 0.9, 2-grams flag 295
    texts, 7 of them as copies of a text with another intent ("I want to transfer money into my
    account" / "I cant transfer money into my account"), 3-grams flag 107, 2 with another intent,
    both BANKING77 label noise ("Has my top-up gone through?" / "Has my top up gone through?").
    Larger ``shingle_size`` values suit longer documents.

    Memory per indexed text record, measured with ``tracemalloc`` over 5000 BANKING77 texts at 128
    permutations: 7.0 KiB at threshold 0.85, 5.7 KiB at 0.9, 4.6 KiB at 0.95. Most of it is
    ``datasketch``'s in-memory LSH tables (per band one key and one set of ids: 21, 16 or 12 bands);
    the signature kept for verification is ``num_perm`` × 4 bytes (uint32) and the exact-hash
    entries ~0.3 KiB. Media records (image, audio) are indexed by content hash only. ``capacity``
    bounds the total (20 000 records ≈ 115 MiB at 0.9): an :meth:`add` at capacity first forgets
    the oldest indexed record (the store normally evicts earlier, through :meth:`forget`).

    Not thread-safe: one ingest loop owns it.
    """

    def __init__(
        self,
        threshold: float = DEFAULT_THRESHOLD,
        num_perm: int = 128,
        shingle_size: int = 3,
        capacity: int | None = 20_000,
        seed: int = 1,
    ) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, int | float):
            raise ConfigError(f"dedup threshold must be a number in [0.85, 0.95]; got {threshold!r}")
        if not MIN_THRESHOLD <= threshold <= MAX_THRESHOLD:
            raise ConfigError(
                f"dedup threshold must be in [{MIN_THRESHOLD}, {MAX_THRESHOLD}] (the near-duplicate "
                f"Jaccard similarity); got {threshold}"
            )
        if not isinstance(num_perm, int) or not 16 <= num_perm <= 1024:
            raise ConfigError(f"dedup num_perm must be an integer in [16, 1024]; got {num_perm!r}")
        if not isinstance(shingle_size, int) or not 1 <= shingle_size <= 16:
            raise ConfigError(f"dedup shingle_size must be an integer in [1, 16]; got {shingle_size!r}")
        if capacity is not None and (not isinstance(capacity, int) or capacity < 1):
            raise ConfigError(f"dedup capacity must be a positive integer or None; got {capacity!r}")
        self.threshold = float(threshold)
        self.num_perm = num_perm
        self.shingle_size = shingle_size
        self.capacity = capacity
        self.bands, self.rows = band_params(self.threshold, num_perm)
        self._permutations = MinHash(num_perm=num_perm, seed=seed, scheme=_SCHEME).permutations
        self._lsh = MinHashLSH(num_perm=num_perm, params=(self.bands, self.rows))
        # id -> content hash, in insertion order (the oldest is evicted first at capacity)
        self._hash_of: dict[str, str] = {}
        # content hash -> the first indexed id with it; later ids with the same hash (a store that
        # already held duplicates) wait in _more_with_hash so forgetting the first keeps them exact
        self._by_hash: dict[str, str] = {}
        self._more_with_hash: dict[str, list[str]] = {}
        # id -> MinHash signature (uint32), text records with at least one shingle only
        self._signature: dict[str, np.ndarray] = {}

    @classmethod
    def from_records(
        cls,
        records: Iterable[Record],
        threshold: float = DEFAULT_THRESHOLD,
        **kwargs: int | None,
    ) -> Deduplicator:
        """A deduplicator that has indexed ``records`` (a device's store, after a restart)."""
        dedup = cls(threshold=threshold, **kwargs)  # type: ignore[arg-type]  # __init__ checks each value
        for record in records:
            dedup.add(record)
        return dedup

    def __len__(self) -> int:
        return len(self._hash_of)

    def __contains__(self, record_id: object) -> bool:
        return record_id in self._hash_of

    def signature(self, record: Record) -> np.ndarray | None:
        """The record's MinHash signature, or None when it has no near-duplicate identity
        (media, or a text with nothing left after normalisation)."""
        if record.modality != "text":
            return None
        grams = shingles(record.text, self.shingle_size)
        if not grams:
            return None
        minhash = MinHash(num_perm=self.num_perm, permutations=self._permutations, scheme=_SCHEME)
        minhash.update_batch([g.encode() for g in grams])
        return minhash.hashvalues.astype(np.uint32, copy=True)

    def _minhash(self, signature: np.ndarray) -> MinHash:
        return MinHash(hashvalues=signature, permutations=self._permutations, scheme=_SCHEME)

    def matches(self, record: Record) -> list[Verdict]:
        """Every indexed record this one duplicates (other than itself), most similar first:
        ``exact`` ones (similarity 1.0), then ``near`` ones with estimated Jaccard >= threshold
        (equally similar ones by id)."""
        digest = record.sha256 or content_hash(record.text)
        found: list[Verdict] = []
        exact_ids = (
            [self._by_hash[digest], *self._more_with_hash.get(digest, ())] if digest in self._by_hash else []
        )
        found.extend(Verdict("exact", i, 1.0) for i in exact_ids if i != record.id)
        signature = self.signature(record)
        if signature is None:
            return found
        seen = set(exact_ids) | {record.id}
        candidates = [key for key in self._lsh.query(self._minhash(signature)) if key not in seen]
        if not candidates:
            return found
        stacked = np.stack([self._signature[key] for key in candidates])
        similarities = np.count_nonzero(stacked == signature, axis=1) / self.num_perm
        near = [
            Verdict("near", key, float(sim))
            for key, sim in zip(candidates, similarities, strict=True)
            if sim >= self.threshold
        ]
        near.sort(key=lambda v: (-(v.similarity or 0.0), v.match_id))  # ties: deterministic
        return found + near

    def check(self, record: Record) -> Verdict:
        """``exact`` when an indexed record has the same content hash (``record.sha256``, or the
        text's :func:`content_hash` when unstamped), else ``near`` for the most similar indexed
        text at or above the threshold, else ``new``. Does not index the record."""
        found = self.matches(record)
        return found[0] if found else NEW

    def add(self, record: Record) -> None:
        """Index a kept record (re-indexes it when its id is already indexed)."""
        if record.id in self._hash_of:
            self.forget(record.id)
        if self.capacity is not None:
            while len(self._hash_of) >= self.capacity:
                self.forget(next(iter(self._hash_of)))
        digest = record.sha256 or content_hash(record.text)
        self._hash_of[record.id] = digest
        if digest in self._by_hash:
            self._more_with_hash.setdefault(digest, []).append(record.id)
        else:
            self._by_hash[digest] = record.id
        signature = self.signature(record)
        if signature is not None:
            self._signature[record.id] = signature
            self._lsh.insert(record.id, self._minhash(signature), check_duplication=False)

    def forget(self, record_id: str) -> bool:
        """Remove a record from matching (it was evicted); False when it was not indexed."""
        digest = self._hash_of.pop(record_id, None)
        if digest is None:
            return False
        if self._by_hash.get(digest) == record_id:
            others = self._more_with_hash.get(digest)
            if others:
                self._by_hash[digest] = others.pop(0)
                if not others:
                    del self._more_with_hash[digest]
            else:
                del self._by_hash[digest]
        else:
            others = self._more_with_hash.get(digest, [])
            if record_id in others:
                others.remove(record_id)
                if not others:
                    del self._more_with_hash[digest]
        if self._signature.pop(record_id, None) is not None:
            self._lsh.remove(record_id)
        return True


# ---- labelled near-duplicates, for tests and benchmarks/corpus.py ------------------------------

EDIT_KINDS = ("case", "punctuation", "whitespace", "typo", "word")


def near_duplicate(text: str, rng: random.Random, kind: str | None = None) -> tuple[str, str]:
    """A small edit of ``text`` and the kind of edit made: ``case`` (whole text upper/lower/title
    case), ``punctuation`` (end punctuation swapped, a comma added), ``whitespace`` (doubled spaces,
    a trailing newline), ``typo`` (two adjacent letters swapped, one dropped, or one doubled, in one
    word) or ``word`` (one word of a text of 10 or more words dropped or repeated; a shorter text gets
    a typo instead, since a changed word in a 5-word sentence is a different sentence)."""
    kind = kind or rng.choice(EDIT_KINDS)
    words = text.split()
    if kind == "word" and len(words) < 10:
        kind = "typo"
    if kind == "case":
        edited = rng.choice((text.upper(), text.lower(), text.title(), text.swapcase()))
    elif kind == "punctuation":
        body = text.rstrip("?!.,;: ")
        edited = body + rng.choice(("", "?", "!", "!!", ".", "??", " ?"))
        if len(words) > 2:
            cut = text.find(" ")
            edited = edited[:cut] + "," + edited[cut:]
    elif kind == "whitespace":
        edited = "  ".join(words) + rng.choice(("\n", " ", "\t"))
    elif kind == "typo":
        targets = [i for i, w in enumerate(words) if sum(c.isalpha() for c in w) >= 4] or list(
            range(len(words))
        )
        i = rng.choice(targets)
        word = words[i]
        j = rng.randrange(max(len(word) - 1, 1))
        op = rng.choice(("swap", "drop", "double"))
        if op == "swap" and len(word) > 1:
            word = word[:j] + word[j + 1] + word[j] + word[j + 2 :]
        elif op == "drop" and len(word) > 1:
            word = word[:j] + word[j + 1 :]
        else:
            word = word[: j + 1] + word[j] + word[j + 1 :]
        words[i] = word
        edited = " ".join(words)
    elif kind == "word":
        i = rng.randrange(len(words))
        if rng.random() < 0.5:
            del words[i]
        else:
            words.insert(i, words[i])
        edited = " ".join(words)
    else:
        raise ValueError(f"unknown edit kind {kind!r}; expected one of {', '.join(EDIT_KINDS)}")
    if edited == text:  # e.g. upper() of an all-caps text: fall back to a typo
        return near_duplicate(text, rng, "typo")
    return edited, kind


@dataclass(frozen=True)
class InjectedSet:
    """Mutually distinct originals, and near-duplicates each naming the original it was made from."""

    originals: tuple[str, ...]
    duplicates: tuple[tuple[int, str, str], ...]  # (index into originals, edited text, edit kind)


def injected_near_duplicates(
    texts: Sequence[str],
    originals: int = 300,
    duplicates: int = 100,
    seed: int = 0,
    max_original_similarity: float = 0.7,
    shingle_size: int = 3,
) -> InjectedSet:
    """Sample ``originals`` texts whose exact pairwise shingle Jaccard is below
    ``max_original_similarity`` (BANKING77 holds its own near-copies, which would otherwise count as
    false positives), then make ``duplicates`` near-duplicates of randomly chosen ones with
    :func:`near_duplicate`, the edit kinds in turn."""
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    chosen: list[str] = []
    chosen_grams: list[set[str]] = []
    for i in order:
        grams = shingles(texts[i], shingle_size)
        if not grams:
            continue
        if any(len(grams & g) / len(grams | g) >= max_original_similarity for g in chosen_grams):
            continue
        chosen.append(texts[i])
        chosen_grams.append(grams)
        if len(chosen) == originals:
            break
    if len(chosen) < originals:
        raise ValueError(f"only {len(chosen)} mutually distinct texts among {len(texts)}; wanted {originals}")
    dups = []
    for k, i in enumerate(rng.sample(range(originals), duplicates)):
        edited, kind = near_duplicate(chosen[i], rng, EDIT_KINDS[k % len(EDIT_KINDS)])
        dups.append((i, edited, kind))
    return InjectedSet(tuple(chosen), tuple(dups))


@dataclass(frozen=True)
class DedupScore:
    """Precision and recall of near/exact-duplicate flags on an :class:`InjectedSet`."""

    threshold: float
    precision: float
    recall: float
    true_positives: int
    false_positives: int
    false_negatives: int
    recall_by_kind: dict[str, float]


def score(injected: InjectedSet, threshold: float = DEFAULT_THRESHOLD, **kwargs: int | None) -> DedupScore:
    """Stream the originals (each checked, then indexed when new), then the duplicates (checked):
    a duplicate flagged as a match of its own original is a true positive, any other flag (an
    original flagged, a duplicate matched to another original) a false positive."""
    dedup = Deduplicator(threshold=threshold, **kwargs)  # type: ignore[arg-type]  # __init__ checks each value
    ids: list[str] = []
    fp = 0
    for n, text in enumerate(injected.originals):
        record = Record(text=text, source="benchmark", device="benchmark", id=f"o{n}")
        ids.append(record.id)
        if dedup.check(record).is_duplicate:
            fp += 1
        else:
            dedup.add(record)
    tp = 0
    hits: dict[str, list[bool]] = {}
    for n, (i, text, kind) in enumerate(injected.duplicates):
        verdict = dedup.check(Record(text=text, source="benchmark", device="benchmark", id=f"d{n}"))
        hit = verdict.is_duplicate and verdict.match_id == ids[i]
        tp += hit
        fp += verdict.is_duplicate and not hit
        hits.setdefault(kind, []).append(hit)
    flagged = tp + fp
    return DedupScore(
        threshold=float(threshold),
        precision=tp / flagged if flagged else 1.0,
        recall=tp / len(injected.duplicates) if injected.duplicates else 1.0,
        true_positives=tp,
        false_positives=fp,
        false_negatives=len(injected.duplicates) - tp,
        recall_by_kind={k: sum(v) / len(v) for k, v in sorted(hits.items())},
    )
