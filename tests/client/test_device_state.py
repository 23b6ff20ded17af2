from pathlib import Path

import pytest
import torch

from fleetlora.client import personal_head
from fleetlora.client.device_state import DeviceState
from fleetlora.common.config import ModelSpec
from fleetlora.common.delta import load_trainable_state, trainable_state
from fleetlora.common.errors import ConfigError, IncompatibleStateError
from fleetlora.common.model import build_model


def test_arrays_round_trip_and_leave_no_scratch_files(tmp_path: Path):
    state = DeviceState(tmp_path / "device")
    assert state.load_arrays("head") is None
    state.save_arrays("head", {"w": torch.arange(6.0).reshape(2, 3)})
    state.save_arrays("head", {"w": torch.ones(2, 3)})  # replaces, in one step
    assert torch.equal(state.load_arrays("head")["w"], torch.ones(2, 3))
    assert [p.name for p in (tmp_path / "device").iterdir()] == ["head.safetensors"]


def test_a_damaged_file_is_reported_not_loaded(tmp_path: Path):
    state = DeviceState(tmp_path)
    state.save_arrays("head", {"w": torch.ones(4)})
    blob = state.path("head").read_bytes()
    state.path("head").write_bytes(blob[: len(blob) // 2])  # torn by a dying disk
    with pytest.raises(IncompatibleStateError, match="damaged"):
        state.load_arrays("head")


def _header(document: bytes) -> bytes:
    """A safetensors file's start: its header's length, then the header."""
    return len(document).to_bytes(8, "little") + document


@pytest.mark.parametrize(
    "blob",
    [
        b"",  # empty
        b"\x00" * 3,  # shorter than the header's length
        (10**12).to_bytes(8, "little") + b"{}",  # a header longer than the file
        _header(b"{not json}"),
        _header(b'{"w": {"dtype": "XX", "shape": [1], "data_offsets": [0, 4]}}') + bytes(4),
        _header(b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}') + bytes(4),  # too short
    ],
    ids=["empty", "stub", "header-past-end", "bad-json", "bad-dtype", "shape-past-data"],
)
def test_every_kind_of_damage_is_refused_by_the_memory_mapped_read(tmp_path: Path, blob: bytes):
    state = DeviceState(tmp_path)
    state.save_arrays("head", {"w": torch.ones(4)})
    state.path("head").write_bytes(blob)
    with pytest.raises(IncompatibleStateError, match="damaged"):
        state.load_arrays("head")


def test_a_file_over_its_cap_is_refused_before_it_is_read(tmp_path: Path):
    state = DeviceState(tmp_path)
    state.save_arrays("head", {"w": torch.ones(4)})
    size = state.path("head").stat().st_size
    assert torch.equal(state.load_arrays("head", max_bytes=size)["w"], torch.ones(4))
    with pytest.raises(IncompatibleStateError, match=f"at most {size - 1}"):
        state.load_arrays("head", max_bytes=size - 1)


def test_loaded_tensors_outlive_the_file_being_replaced_and_never_write_to_it(tmp_path: Path):
    """Memory-mapped, copy-on-write: the device replaces files by rename, which loaded tensors survive."""
    state = DeviceState(tmp_path)
    state.save_arrays("head", {"w": torch.ones(1024)})
    loaded = state.load_arrays("head")
    loaded["w"].add_(1.0)  # a write lands in the process's own copy, not in the file
    assert torch.equal(state.load_arrays("head")["w"], torch.ones(1024))
    state.save_arrays("head", {"w": torch.zeros(1024)})
    assert torch.equal(loaded["w"], torch.full((1024,), 2.0))
    assert torch.equal(state.load_arrays("head")["w"], torch.zeros(1024))


def test_the_folder_comes_from_the_node_config_or_the_simulated_partition(tmp_path: Path):
    assert DeviceState.locate({"state-dir": str(tmp_path)}, {}).root == tmp_path
    simulated = DeviceState.locate({"partition-id": 3}, {"device-state": str(tmp_path)})
    assert simulated.root == tmp_path / "partition-3"
    with pytest.raises(ConfigError, match="state-dir"):
        DeviceState.locate({}, {})


def test_personal_head_is_kept_and_restored_but_never_the_adapter(tmp_path: Path, tiny_spec: ModelSpec):
    loaded = build_model(tiny_spec)
    device = DeviceState(tmp_path)
    global_state = trainable_state(loaded.model)
    assert personal_head.restore(loaded, device) is False  # nothing kept yet: the global head stays

    with torch.no_grad():  # pretend local training moved every trainable weight
        for param in loaded.model.parameters():
            if param.requires_grad:
                param.add_(1.0)
    trained = trainable_state(loaded.model)
    personal_head.keep(loaded, device)
    load_trainable_state(loaded.model, global_state)  # the next round's global adapter arrives

    assert personal_head.restore(loaded, device) is True
    now = trainable_state(loaded.model)
    for name, tensor in now.items():
        expected = trained[name] if personal_head.HEAD_MARKER in name else global_state[name]
        assert torch.equal(tensor, expected), name
    kept = device.load_arrays(next(p.stem for p in tmp_path.iterdir()))
    assert kept and all(personal_head.HEAD_MARKER in name for name in kept)


def test_a_damaged_personal_head_is_set_aside_and_training_goes_on(tmp_path: Path, tiny_spec: ModelSpec):
    loaded = build_model(tiny_spec)
    device = DeviceState(tmp_path)
    personal_head.keep(loaded, device)
    (path,) = tmp_path.iterdir()
    path.write_bytes(b"not safetensors")
    assert personal_head.restore(loaded, device) is False
    assert not path.exists() and path.with_suffix(".damaged").exists()


def test_json_documents_round_trip_and_damage_is_reported(tmp_path: Path):
    state = DeviceState(tmp_path)
    assert state.load_json("accountant") is None
    state.save_json("accountant", {"history": [[1.1, 0.01, 20]]})
    assert state.load_json("accountant") == {"history": [[1.1, 0.01, 20]]}
    state.path("accountant", ".json").write_text('{"history": [[1.1, ')  # torn
    with pytest.raises(IncompatibleStateError, match="damaged"):
        state.load_json("accountant")
    assert state.set_aside("accountant", ".json").name == "accountant.damaged"
