import dataclasses
import io
import json
import re
import struct
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetlora.common.delta import sha256_hex
from fleetlora.common.package import (
    MAGIC,
    MAX_MANIFEST_BYTES,
    SIGNATURE_BYTES,
    SIGNING_CONTEXT,
    Expectations,
    Manifest,
    Package,
    PackageError,
    PackageRejection,
    check_claims,
    read_manifest,
    read_package,
    read_payload,
    sign,
    utc_iso,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
PAYLOAD = bytes(range(256)) * 40  # 10 KiB
KEY = Ed25519PrivateKey.generate()
OTHER_KEY = Ed25519PrivateKey.generate()
HEADER = len(MAGIC) + 4
PACKAGES_DOC = Path(__file__).resolve().parents[2] / "docs" / "packages.md"


def _manifest(payload: bytes = PAYLOAD, **changes) -> Manifest:
    fields = {
        "tenant": "acme",
        "lineage": "L",
        "model": {"model.name": "tiny", "model.labels": ["a", "b"]},
        "base_sha256": "b" * 64,
        "base_bytes": 1_000_000,
        "from_version": 3,
        "to_version": 4,
        "sequence": 4,
        "created": utc_iso(NOW),
        "expires": utc_iso(NOW + timedelta(days=7)),
        "payload_sha256": sha256_hex(payload),
        "payload_length": len(payload),
        "codec": "fp32+zstd",
        "reconstruction_error": 0.0,
    }
    return Manifest(**{**fields, **changes})


def _expect(**changes) -> Expectations:
    fields = {
        "tenant": "acme",
        "base_sha256": "b" * 64,
        "active_version": 3,
        "last_sequence": 3,
        "max_payload_bytes": 100_000,
    }
    return Expectations(**{**fields, **changes})


def _blob(manifest: Manifest | None = None, payload: bytes = PAYLOAD, key: Ed25519PrivateKey = KEY) -> bytes:
    return sign(manifest or _manifest(payload), payload, key).to_bytes()


def _read(blob: bytes) -> Package:
    return read_package(io.BytesIO(blob), KEY.public_key())


def _reason(blob: bytes) -> str:
    with pytest.raises(PackageError) as caught:
        _read(blob)
    return caught.value.reason


def _flip(blob: bytes, index: int) -> bytes:
    return blob[:index] + bytes([blob[index] ^ 0x01]) + blob[index + 1 :]


def _manifest_length(blob: bytes) -> int:
    return struct.unpack(">I", blob[len(MAGIC) : HEADER])[0]


def test_good_package_reads_back_equal():
    package = sign(_manifest(), PAYLOAD, KEY)
    blob = package.to_bytes()
    assert blob.startswith(MAGIC)
    assert len(blob) == HEADER + len(package.manifest.canonical()) + SIGNATURE_BYTES + len(PAYLOAD)
    assert _read(blob) == package
    # read_manifest stops at the payload's first byte.
    stream = io.BytesIO(blob)
    manifest, signature = read_manifest(stream, KEY.public_key())
    assert (manifest, signature) == (package.manifest, package.signature)
    assert read_payload(stream, manifest) == PAYLOAD


def test_manifest_is_canonical_json():
    manifest = _manifest()
    text = manifest.canonical()
    assert json.loads(text) == dataclasses.asdict(manifest)
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":")).encode()
    assert Manifest.parse(text) == manifest


def test_sign_refuses_a_manifest_that_does_not_describe_the_payload():
    with pytest.raises(ValueError):
        sign(_manifest(), PAYLOAD + b"x", KEY)
    with pytest.raises(ValueError):
        sign(_manifest(payload_sha256="0" * 64), PAYLOAD, KEY)


def test_signature_by_another_key_is_refused():
    assert _reason(_blob(key=OTHER_KEY)) == "bad-signature"


def test_signature_without_the_signing_context_is_refused():
    manifest = _manifest().canonical()
    blob = MAGIC + struct.pack(">I", len(manifest)) + manifest + KEY.sign(manifest) + PAYLOAD
    assert _reason(blob) == "bad-signature"


@pytest.mark.parametrize("where", ["first", "middle", "last", "signature"])
def test_flipped_manifest_or_signature_byte_is_refused(where: str):
    blob = _blob()
    length = _manifest_length(blob)
    index = {
        "first": HEADER,
        "middle": HEADER + length // 2,
        "last": HEADER + length - 1,
        "signature": HEADER + length + SIGNATURE_BYTES // 2,
    }[where]
    assert _reason(_flip(blob, index)) == "bad-signature"


@pytest.mark.parametrize("offset", [0, len(PAYLOAD) // 2, len(PAYLOAD) - 1])
def test_tampered_payload_is_refused(offset: int):
    blob = _blob()
    assert _reason(_flip(blob, len(blob) - len(PAYLOAD) + offset)) == "tampered"


def test_truncated_package_is_refused_at_every_cut_point():
    blob = _blob()
    length = _manifest_length(blob)
    payload_start = HEADER + length + SIGNATURE_BYTES
    cuts = [
        0,
        3,  # inside the magic bytes
        len(MAGIC) + 2,  # inside the manifest length
        HEADER + length // 2,  # inside the manifest
        HEADER + length + 10,  # inside the signature
        payload_start,  # no payload at all
        payload_start + len(PAYLOAD) // 2,
        len(blob) - 1,
    ]
    for cut in cuts:
        assert _reason(blob[:cut]) == "truncated", cut


def test_trailing_bytes_are_refused():
    assert _reason(_blob() + b"\x00") == "oversize"
    assert _reason(_blob() + PAYLOAD) == "oversize"


def test_bad_magic_is_refused():
    blob = _blob()
    assert _reason(b"PK\x03\x04" + blob[4:]) == "malformed"
    assert _reason(_flip(blob, len(MAGIC) - 1)) == "malformed"


@pytest.mark.parametrize("length", [MAX_MANIFEST_BYTES + 1, 2**32 - 1])
def test_huge_declared_manifest_length_is_refused_before_reading(length: int):
    blob = MAGIC + struct.pack(">I", length) + b"{}"  # far shorter than declared: must not wait for it
    assert _reason(blob) == "malformed"


@pytest.mark.parametrize(
    "manifest",
    [
        b"not json",
        b"[1, 2]",
        b'{"tenant": "acme"}',
        json.dumps({**dataclasses.asdict(_manifest()), "format": 2}, sort_keys=True).encode(),
        json.dumps({**dataclasses.asdict(_manifest()), "extra": 1}, sort_keys=True).encode(),
        json.dumps({**dataclasses.asdict(_manifest()), "expires": "next tuesday"}, sort_keys=True).encode(),
        b"\xff\xfe not utf-8",
    ],
    ids=["not-json", "list", "missing-fields", "format-2", "extra-field", "bad-date", "not-utf8"],
)
def test_signed_but_malformed_manifest_is_refused(manifest: bytes):
    blob = (
        MAGIC + struct.pack(">I", len(manifest)) + manifest + KEY.sign(SIGNING_CONTEXT + manifest) + PAYLOAD
    )
    assert _reason(blob) == "malformed"


def _claims_reason(manifest: Manifest, expect: Expectations, now: datetime = NOW) -> str:
    with pytest.raises(PackageError) as caught:
        check_claims(manifest, expect, now)
    return caught.value.reason


def test_claims_that_hold_pass():
    check_claims(_manifest(), _expect(), NOW)
    check_claims(_manifest(), _expect(), NOW + timedelta(days=7) - timedelta(seconds=1))


def test_wrong_tenant_is_refused():
    assert _claims_reason(_manifest(), _expect(tenant="other")) == "wrong-tenant"


def test_wrong_base_is_refused():
    assert _claims_reason(_manifest(), _expect(base_sha256="c" * 64)) == "wrong-base"


def test_expired_package_is_refused():
    expires = NOW + timedelta(days=7)
    assert _claims_reason(_manifest(), _expect(), now=expires) == "expired"
    assert _claims_reason(_manifest(), _expect(), now=expires + timedelta(days=30)) == "expired"


def test_rollback_to_an_older_sequence_is_refused():
    older = _manifest(from_version=1, to_version=2, sequence=2)
    assert _claims_reason(older, _expect(active_version=2, last_sequence=5)) == "rollback"


def test_replay_of_the_applied_sequence_is_refused():
    # The package that brought the device to v4 arrives a second time.
    assert _claims_reason(_manifest(), _expect(active_version=4, last_sequence=4)) == "rollback"


def test_wrong_from_version_is_refused():
    assert _claims_reason(_manifest(from_version=2), _expect()) == "wrong-from-version"
    # A delta cannot be applied by a device that holds no adapter yet.
    assert _claims_reason(_manifest(), _expect(active_version=None, last_sequence=0)) == "wrong-from-version"


def test_oversize_declared_payload_is_refused():
    assert _claims_reason(_manifest(), _expect(max_payload_bytes=len(PAYLOAD) - 1)) == "oversize"
    check_claims(_manifest(), _expect(max_payload_bytes=len(PAYLOAD)), NOW)


def test_full_package_is_accepted_over_an_active_version_when_its_sequence_is_higher():
    full = _manifest(from_version=None, to_version=9, sequence=9)
    check_claims(full, _expect(active_version=3, last_sequence=3), NOW)
    check_claims(full, _expect(active_version=None, last_sequence=0), NOW)
    assert _claims_reason(full, _expect(active_version=9, last_sequence=9)) == "rollback"
    assert _claims_reason(full, _expect(active_version=12, last_sequence=12)) == "rollback"


def _documented_reasons() -> set[str]:
    """The reason codes in the table of docs/packages.md section 8."""
    section = PACKAGES_DOC.read_text().split("## 8. Reason codes", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z-]+)` \|", section, flags=re.MULTILINE))


@pytest.mark.parametrize("reason", list(PackageRejection), ids=str)
def test_every_rejection_reason_is_documented(reason: PackageRejection):
    assert reason.value in _documented_reasons()


def test_the_docs_list_no_reason_the_code_lacks():
    assert _documented_reasons() == {r.value for r in PackageRejection}


def test_a_rejection_reads_as_its_code():
    error = PackageError(PackageRejection.WRONG_FROM_VERSION, "package updates v3, this device holds v2")
    assert error.reason == "wrong-from-version"
    assert (
        str(error) == "update package rejected (wrong-from-version): package updates v3, this device holds v2"
    )
