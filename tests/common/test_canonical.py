from fleetlora.common.canonical import canonical_json


def test_equal_documents_give_equal_bytes_whatever_their_key_order():
    assert canonical_json({"b": 1, "a": [1, 2]}) == canonical_json({"a": [1, 2], "b": 1})


def test_canonical_json_has_sorted_keys_no_spaces_and_ascii_only():
    assert canonical_json({"z": "é", "a": {"y": None, "x": 1.5}}) == b'{"a":{"x":1.5,"y":null},"z":"\\u00e9"}'
