"""The embedded default corpus: customer requests typed at service terminals, labelled by intent.

It exists so ``make demo`` runs on a fresh machine with no data files. Sentences come from a
small template grammar (intent → templates → slot fillers). Every distinct sentence is generated,
shuffled with a fixed seed and split once, so the train and test splits never share a sentence
and are identical on every machine.
"""

from __future__ import annotations

import itertools
import random
from functools import cache

from fleetlora.common.data.examples import Example

_SLOTS: dict[str, tuple[str, ...]] = {
    "card": ("card", "debit card", "credit card", "bank card", "visa card", "new card"),
    "money": ("money", "funds", "cash", "my salary", "fifty euros", "the payment"),
    "when": ("today", "yesterday", "this morning", "last week", "two days ago", "on monday"),
    "place": ("at the shop", "online", "abroad", "at the ATM", "in the app", "at a restaurant"),
    "please": ("", "please ", "can you ", "I need to ", "could you help me "),
}
# Wrapped around every template: how people open and close a request at a terminal.
_OPENINGS = ("", "Hi, ", "Hello, ", "Excuse me, ", "Quick question: ")
_CLOSINGS = ("", " thanks", " asap", ", please help", "?")

_INTENTS: dict[str, tuple[str, ...]] = {
    "card_lost": (
        "{please}block my {card}, I lost it {when}",
        "I can't find my {card} since {when}",
        "my {card} was stolen {place}",
        "{please}freeze the {card} I lost {place}",
        "someone took my {card} {when}",
    ),
    "card_declined": (
        "my {card} was declined {place}",
        "why did my {card} not work {place} {when}",
        "the {card} got rejected {when}",
        "payment with my {card} failed {place}",
        "{please}tell me why the {card} keeps getting refused",
    ),
    "balance": (
        "{please}show my balance",
        "how much {money} do I have left",
        "what is my account balance {when}",
        "{please}check how much is on my {card}",
        "is there enough {money} on my account",
    ),
    "transfer": (
        "{please}send {money} to my sister",
        "I want to transfer {money} to another account {when}",
        "how do I move {money} between my accounts",
        "{please}wire {money} abroad",
        "make a transfer of {money} to my landlord",
    ),
    "transfer_pending": (
        "my transfer from {when} has not arrived",
        "the {money} I sent {when} is still pending",
        "why is my transfer taking so long",
        "{please}check where the {money} I sent {when} is",
        "the transfer {place} still shows as processing",
    ),
    "cash_withdrawal": (
        "the ATM did not give me my {money} {when}",
        "{please}explain the withdrawal fee {place}",
        "I took out {money} at the ATM but it was charged twice",
        "how much {money} can I withdraw {when}",
        "the cash machine kept my {card} {when}",
    ),
    "pin_change": (
        "{please}change the PIN of my {card}",
        "I forgot the PIN for my {card}",
        "how do I reset my PIN {place}",
        "my {card} is locked after a wrong PIN {when}",
        "{please}unblock my PIN",
    ),
    "refund": (
        "I want a refund for a purchase {place}",
        "{please}return the {money} for the order I cancelled {when}",
        "the merchant {place} promised a refund {when}",
        "where is my refund from {when}",
        "how long does a refund to my {card} take",
    ),
    "exchange_rate": (
        "what exchange rate do I get {place}",
        "{please}tell me the rate for paying {place}",
        "why was the currency conversion so expensive {when}",
        "how much is the fee for spending {money} abroad",
        "which rate applies to my {card} {place}",
    ),
    "address_change": (
        "{please}update my home address",
        "I moved {when} and need to change my address",
        "how do I change the address on my {card}",
        "my address in the app is wrong",
        "{please}send my new {card} to my new address",
    ),
}

INTENTS: tuple[str, ...] = tuple(sorted(_INTENTS))
_TRAIN_PER_INTENT = 240
_TEST_PER_INTENT = 60


def _fill(template: str) -> list[str]:
    names = [n for n in _SLOTS if "{" + n + "}" in template]
    sentences = []
    for values in itertools.product(*(_SLOTS[n] for n in names)):
        text = template.format(**dict(zip(names, values, strict=True)))
        for opening, closing in itertools.product(_OPENINGS, _CLOSINGS):
            sentence = opening + text + closing
            sentences.append(sentence[0].upper() + sentence[1:])
    return sentences


@cache
def _splits() -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    rng = random.Random(20261123)
    train: list[Example] = []
    test: list[Example] = []
    for intent in INTENTS:
        sentences = sorted({s for t in _INTENTS[intent] for s in _fill(t)})
        rng.shuffle(sentences)
        test.extend(Example(s, intent) for s in sentences[:_TEST_PER_INTENT])
        train.extend(
            Example(s, intent) for s in sentences[_TEST_PER_INTENT : _TEST_PER_INTENT + _TRAIN_PER_INTENT]
        )
    rng.shuffle(train)
    rng.shuffle(test)
    return tuple(train), tuple(test)


def builtin_examples(split: str = "train") -> list[Example]:
    """The built-in corpus: ``train`` (2,400 examples) or ``test`` (600), 10 intents."""
    train, test = _splits()
    return list(train if split == "train" else test)
