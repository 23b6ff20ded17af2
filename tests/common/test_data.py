import json
from pathlib import Path

import pytest

from fleetlora.common.data import Example, load_examples, split_holdout
from fleetlora.common.data.builtin import INTENTS
from fleetlora.common.data.examples import labels_of
from fleetlora.common.errors import DataError


def test_csv_with_label_column(tmp_path: Path):
    path = tmp_path / "d.csv"
    path.write_text('text,category\n"Hello, world",greet\nBye,leave\n')
    assert load_examples(path) == [Example("Hello, world", "greet"), Example("Bye", "leave")]


def test_jsonl_and_txt(tmp_path: Path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"text": "a b", "label": 3}) + "\n\n" + json.dumps({"text": "c", "label": 4}))
    assert load_examples(jsonl) == [Example("a b", "3"), Example("c", "4")]
    txt = tmp_path / "d.txt"
    txt.write_text("ROMEO:\nHello there.\n\nJULIET:\nGood night.\n")
    assert load_examples(txt) == [Example("ROMEO:\nHello there."), Example("JULIET:\nGood night.")]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.csv", "", "no examples"),
        ("header_only.csv", "text,label\n", "no examples"),
        ("no_text.csv", "body,label\nx,y\n", "no 'text' column"),
        ("ragged.csv", "text,label\na,b\nc,d,e\n", "line 3: 3 fields"),
        ("quote.csv", 'text,label\n"unterminated,x\n', "malformed CSV"),
        ("bad.jsonl", '{"text": "ok"}\n{not json}\n', "line 2: not valid JSON"),
        ("notext.jsonl", '{"body": "x"}\n', "'text' string"),
        ("mixed.csv", "text,label\na,x\nb,\n", "have no label"),
        ("data.parquet", "x", "Unsupported data file type"),
    ],
)
def test_bad_files_give_a_clear_error(tmp_path: Path, name: str, content: str, message: str):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_examples(path)


def test_missing_file_names_the_path(tmp_path: Path):
    with pytest.raises(DataError, match=r"not found: .*nope\.csv"):
        load_examples(tmp_path / "nope.csv")


def test_builtin_corpus_is_deterministic_balanced_and_disjoint():
    train, test = load_examples("builtin"), load_examples("builtin-test")
    assert len(train) == 2400 and len(test) == 600
    assert labels_of(train) == labels_of(test) == INTENTS
    assert not {e.text for e in train} & {e.text for e in test}
    assert load_examples("builtin") == train


def test_holdout_split_is_stable_as_the_corpus_grows():
    examples = [Example(f"text number {i}") for i in range(1000)]
    train, held = split_holdout(examples, 0.2)
    assert 150 < len(held) < 250 and len(train) + len(held) == 1000
    grown_train, grown_held = split_holdout([*examples, *(Example(f"new {i}") for i in range(500))], 0.2)
    assert set(held) <= set(grown_held) and set(train) <= set(grown_train)


def test_banking77_loads(banking77: Path):
    examples = load_examples(banking77 / "train.csv")
    assert len(examples) == 10003 and len(labels_of(examples)) == 77
