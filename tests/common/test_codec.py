import math

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
