import json
import math
import re

import pytest
import torch
import zstandard

from fleetlora.common.codec import (
    LADDER,
    Codec,
    CodecError,
    decode,
    encode,
    inflated_bound,
    relative_error,
)
from fleetlora.common.delta import packed, serialize


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Adapter-like Gaussian tensors: LoRA A/B matrices, a head and a bias."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {
        "layer.0.lora_A": (8, 64),
        "layer.0.lora_B": (64, 8),
        "head.weight": (10, 64),
        "head.bias": (10,),
    }
    return {name: 0.05 * torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def _bound(codec: Codec) -> float:
    if codec.lossless:
        return 0.0
    if codec.precision == "fp16":
        return 1e-3
    # Keeping the largest share d of entries keeps at least d of the energy; then int8 rounding.
    return math.sqrt(1 - codec.density) + 2e-2


@pytest.mark.parametrize("codec", LADDER, ids=lambda c: c.name)
def test_every_codec_round_trips_within_its_bound(codec: Codec):
    state = _state()
    blob = encode(state, codec)
    decoded = decode(blob, codec, max_bytes=inflated_bound(state))
    assert decoded.keys() == state.keys()
    for name, tensor in state.items():
        assert decoded[name].dtype == torch.float32
        assert decoded[name].shape == tensor.shape
    error = relative_error(state, decoded)
    if codec.lossless:
        assert error == 0.0
        assert all(torch.equal(decoded[n], state[n]) for n in state)
    else:
        assert 0 < error < _bound(codec)
    if codec.density < 1:
        for name, tensor in state.items():
            kept = math.ceil(codec.density * tensor.numel())
            assert int((decoded[name] != 0).sum()) <= kept
            # The entries kept are the largest in magnitude.
            threshold = tensor.abs().flatten().topk(kept).values.min()
            assert bool((decoded[name][tensor.abs() < threshold] == 0).all())


def test_ladder_goes_from_faithful_to_small():
    state = _state(1)
    errors = [relative_error(state, decode(encode(state, c), c, inflated_bound(state))) for c in LADDER]
    sizes = [len(encode(state, c)) for c in LADDER]
    assert LADDER[0].lossless and errors[0] == 0.0
    assert errors == sorted(errors)
    assert sizes[0] > sizes[1] > sizes[2] > sizes[-1]


@pytest.mark.parametrize("codec", LADDER, ids=lambda c: c.name)
def test_parse_inverts_name(codec: Codec):
    assert Codec.parse(codec.name) == codec


@pytest.mark.parametrize(
    "name",
    [
        "",
        "fp32",
        "fp64+zstd",
        "fp32+gzip",
        "fp32+zstd+zstd",
        "int8+zstd+top",
        "int8+zstd+topx",
        "int8+zstd+top0",
        "int8+zstd+top1.5",
        "int8+zstd+topnan",
        "int8+zstd+top-0.5",
        "fp16+zstd+top0.5",
        "int8+zstd+top0.5+extra",
    ],
)
def test_unknown_codec_names_are_refused(name: str):
    with pytest.raises(CodecError):
        Codec.parse(name)


def test_decode_refuses_to_inflate_past_max_bytes():
    state = _state()
    codec = Codec("fp32")
    blob = encode(state, codec)
    inflated = len(serialize(state))
    assert decode(blob, codec, max_bytes=inflated).keys() == state.keys()
    with pytest.raises(CodecError):
        decode(blob, codec, max_bytes=inflated - 1)


def test_decode_refuses_a_decompression_bomb():
    # 16 MiB of zeros compresses to a few KiB; a 1 MiB limit must stop it before it is inflated.
    bomb = zstandard.ZstdCompressor(level=3).compress(serialize({"w": torch.zeros(4 * 1024 * 1024)}))
    assert len(bomb) < 64 * 1024
    with pytest.raises(CodecError):
        decode(bomb, Codec("fp32"), max_bytes=1024 * 1024)


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"garbage, not a payload",
        bytes(range(256)) * 4,
        zstandard.ZstdCompressor().compress(b"zstd data, but not safetensors inside"),
    ],
    ids=["empty", "text", "bytes", "zstd-text"],
)
def test_garbage_bytes_raise_codec_error(blob: bytes):
    with pytest.raises(CodecError):
        decode(blob, Codec("fp32"), max_bytes=1 << 20)


def test_truncated_payload_raises_codec_error():
    blob = encode(_state(), Codec("int8"))
    with pytest.raises(CodecError):
        decode(blob[: len(blob) // 2], Codec("int8"), max_bytes=1 << 20)


@pytest.mark.parametrize(
    ("written", "read"),
    [("fp32", "fp16"), ("fp32", "int8"), ("fp16", "fp32"), ("int8", "fp32")],
)
def test_payload_decoded_with_another_codec_is_refused(written: str, read: str):
    blob = encode(_state(), Codec(written))  # type: ignore[arg-type]
    with pytest.raises(CodecError):
        decode(blob, Codec(read), max_bytes=1 << 20)  # type: ignore[arg-type]


def test_fp16_overflow_gives_infinite_error():
    state = _state()
    state["head.weight"][0, 0] = 1e6  # beyond fp16's largest finite value, 65504
    codec = Codec("fp16")
    decoded = decode(encode(state, codec), codec, max_bytes=inflated_bound(state))
    assert not math.isfinite(relative_error(state, decoded))
    # The lossless and int8 codecs still carry it.
    for other in (Codec("fp32"), Codec("int8")):
        error = relative_error(state, decode(encode(state, other), other, max_bytes=inflated_bound(state)))
        assert math.isfinite(error) and error < 2e-2


def test_relative_error_of_all_zero_state():
    zero = {"w": torch.zeros(3, 3)}
    assert relative_error(zero, {"w": torch.zeros(3, 3)}) == 0.0
    assert relative_error(zero, {"w": torch.ones(3, 3)}) == math.inf


def test_encoding_is_deterministic():
    state = _state(2)
    for codec in LADDER:
        assert encode(state, codec) == encode(state, codec)


def test_an_fp32_payload_decodes_to_writable_views_of_one_buffer_in_name_order():
    state = {**_state(), "scalar": torch.tensor(3.0), "empty": torch.zeros(0, 4)}
    decoded = decode(encode(state, Codec("fp32")), Codec("fp32"), max_bytes=inflated_bound(state))
    assert list(decoded) == sorted(state)
    assert all(torch.equal(decoded[n], state[n]) and decoded[n].shape == state[n].shape for n in state)
    pieces = packed(decoded, sorted(decoded))  # what the coordinator's norm and fold take, a few calls
    assert pieces is not None and sum(p.numel() for p in pieces) == sum(t.numel() for t in state.values())
    decoded["head.bias"].add_(1.0)  # its own memory, not the payload's bytes
    assert torch.equal(decoded["head.bias"], state["head.bias"] + 1.0)


def test_an_fp32_payload_refuses_other_dtypes_and_leaves_side_arrays_out():
    side = {"w": torch.ones(3), "w@scale": torch.tensor([2], dtype=torch.int32)}
    blob = zstandard.ZstdCompressor().compress(serialize(side))
    assert list(decode(blob, Codec("fp32"), max_bytes=1 << 20)) == ["w"]
    blob = zstandard.ZstdCompressor().compress(serialize({"w": torch.ones(3, dtype=torch.float16)}))
    with pytest.raises(
        CodecError, match=r"does not hold fp32\+zstd tensors \(w is torch.float16, not torch.float32\)"
    ):
        decode(blob, Codec("fp32"), max_bytes=1 << 20)


def _container(tensors: dict[str, tuple[str, list[int], tuple[int, int]]], data: bytes = b"") -> bytes:
    """Hand-written safetensors (name → dtype, shape, data offsets), zstd-compressed: what a hostile device
    may seal, its header as it likes."""
    header = json.dumps(
        {
            name: {"dtype": dtype, "shape": shape, "data_offsets": offsets}
            for name, (dtype, shape, offsets) in tensors.items()
        }
    ).encode()
    return zstandard.ZstdCompressor().compress(len(header).to_bytes(8, "little") + header + data)


_F32 = torch.arange(1.0, 5.0).numpy().tobytes()  # four float32 values, 16 bytes


@pytest.mark.parametrize(
    ("tensors", "data"),
    [
        ({"w": ("F32", [3], (0, 16))}, _F32),  # 16 bytes for 3 values
        ({"w": ("F32", [1], (0, 3))}, _F32[:3]),  # not a whole float32
        ({"a": ("F32", [3], (0, 12)), "b": ("F32", [2], (8, 16))}, _F32),  # overlapping
        ({"a": ("F32", [1], (0, 4)), "b": ("F32", [2], (8, 16))}, _F32),  # a gap
        ({"w": ("F32", [2], (0, 8))}, _F32),  # bytes past the last tensor
        ({"w": ("F32", [4], (0, 16)), "x": ("F32", [1], (16, 20))}, _F32),  # past the end
        ({"w": ("F32", [-1], (0, 4))}, _F32[:4]),  # a negative dimension
        ({"w": ("F32", [2**32, 2**32, 2**2], (0, 4))}, _F32[:4]),  # 2**66 values: past 64 bits
        ({"w": ("F32", [0, 2**63], (0, 0))}, b""),  # no values, a dimension past int64
        ({"w": ("F32", [0, 2**64 - 1], (0, 0))}, b""),
        ({"w": ("F32", [4], (0, 16)), "w@x": ("F4", [2], (16, 17))}, _F32 + b"\0"),  # see below
        ({"w": (">f4", [4], (0, 16))}, _F32),  # no such dtype (safetensors has no byte order)
        ({"w": ("F8_E4M3", [16], (0, 16))}, _F32),
    ],
    ids=[
        "short-shape",
        "partial-value",
        "overlap",
        "gap",
        "trailing",
        "past-end",
        "negative-dim",
        "size-wraps",
        "empty-dim-past-int64",
        "empty-dim-past-uint64",
        "side-dtype-torch-lacks",
        "big-endian",
        "fp8",
    ],
)
@pytest.mark.parametrize("codec", [Codec("fp32"), Codec("fp16"), Codec("int8")], ids=lambda c: c.name)
def test_a_hostile_container_is_a_codec_error_or_decodes_exactly(tensors, data: bytes, codec: Codec):
    # Whatever a device seals, decode answers a CodecError (the reply's drop) or its tensors; nothing else
    # may escape into the coordinator's round. The fp32 codec leaves side arrays (named with @) out unread,
    # so a side array of a dtype torch lacks decodes there; the others read them.
    blob = _container(tensors, data)
    if codec.lossless and "w@x" in tensors:
        assert torch.equal(decode(blob, codec, max_bytes=1 << 20)["w"], torch.arange(1.0, 5.0))
    else:
        with pytest.raises(CodecError):
            decode(blob, codec, max_bytes=1 << 20)


def test_an_fp32_payload_decodes_scalars_empty_arrays_and_any_name_order_as_written():
    written = _container(
        {
            "\u00e9": ("F32", [], (0, 4)),  # sorts after "a" and "Z"
            "a": ("F32", [0, 5], (4, 4)),
            "Z": ("F32", [2, 1], (4, 12)),
            "b": ("F32", [1], (12, 16)),
        },
        _F32,
    )
    decoded = decode(written, Codec("fp32"), max_bytes=1 << 20)
    assert list(decoded) == ["Z", "a", "b", "\u00e9"] and all(
        t.dtype == torch.float32 for t in decoded.values()
    )
    assert torch.equal(decoded["\u00e9"], torch.tensor(1.0)) and decoded["a"].shape == (0, 5)
    assert torch.equal(decoded["Z"], torch.tensor([[2.0], [3.0]])) and torch.equal(
        decoded["b"], torch.tensor([4.0])
    )
    only_empty = _container({"a": ("F32", [0], (0, 0)), "b": ("F32", [3, 0], (0, 0))})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the dtype of an all-empty payload is the codec's, not torch's
    try:
        decoded = decode(only_empty, Codec("fp32"), max_bytes=1 << 20)
    finally:
        torch.set_default_dtype(previous)
    assert {n: (t.shape, t.dtype) for n, t in decoded.items()} == {
        "a": ((0,), torch.float32),
        "b": ((3, 0), torch.float32),
    }


def test_a_top_k_payload_may_not_declare_dense_arrays_past_the_bound():
    # A top-k tensor's dense size is what its @shape says: a few bytes that would have the coordinator
    # allocate and zero any amount of memory. All of them together must fit the decode bound.
    def sparse(shape: list, count: int = 1) -> bytes:
        tensors: dict[str, torch.Tensor] = {}
        for i in range(count):
            tensors |= {
                f"w{i}": torch.ones(1, dtype=torch.int8),
                f"w{i}@scale": torch.ones(1),
                f"w{i}@index": torch.zeros(1, dtype=torch.int32),
                f"w{i}@shape": torch.tensor(shape),
            }
        return zstandard.ZstdCompressor().compress(serialize(tensors))

    codec, bound = Codec("int8", 0.5), 1 << 12  # room for 1,024 float32 values
    assert decode(sparse([2, 64]), codec, max_bytes=bound)["w0"].shape == (2, 64)
    assert decode(sparse([1000]), codec, max_bytes=bound)["w0"].shape == (1000,)
    for blob, reason in (
        (sparse([1 << 24]), "its shapes hold 16777216 values, more than the 1024 allowed"),  # 64 MiB
        (sparse([300], count=4), "its shapes hold 1200 values"),  # each within the bound, not together
        (sparse([-(1 << 12), -(1 << 12)]), "w0@shape is not a shape"),  # a product of 16 M values
        (sparse([[4]]), "w0@shape is not a shape"),  # torch.Size would raise a TypeError
    ):
        with pytest.raises(CodecError, match=re.escape(reason)):
            decode(blob, codec, max_bytes=bound)
