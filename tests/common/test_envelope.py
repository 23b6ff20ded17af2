import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fleetlora.common.envelope import (
    EnvelopeError,
    SealedUpload,
    UploadContext,
    from_records,
    open_sealed,
    seal,
    to_records,
)

COORDINATOR = X25519PrivateKey.generate()
DEVICE = Ed25519PrivateKey.generate()
CONTEXT = UploadContext(tenant="acme", device_id="kiosk-7", round=3, base_sha256="ab" * 32, from_version=12)
DELTA = bytes(range(256)) * 64


def _open(sealed: SealedUpload, claimed: UploadContext = CONTEXT, **keys) -> bytes:
    return open_sealed(
        sealed,
        claimed=claimed,
        expected=CONTEXT,
        coordinator_key=keys.get("coordinator_key", COORDINATOR),
        device_public=keys.get("device_public", DEVICE.public_key()),
    )


def test_a_sealed_upload_opens_to_the_same_bytes_and_hides_them():
    sealed = seal(DELTA, CONTEXT, COORDINATOR.public_key(), DEVICE)
    assert DELTA[:64] not in sealed.ciphertext
    assert len(sealed.ciphertext) == len(DELTA) + 32 + 16  # encapsulated key + GCM tag
    assert _open(sealed) == DELTA


@pytest.mark.parametrize(
    ("claim", "reason"),
    [
        ({"device_id": "kiosk-8"}, "sent by another"),
        ({"round": 2}, r"round 2, not 3 \(replayed\)"),
        ({"base_sha256": "cd" * 32}, "base model cdcdcdcdcdcd"),
        ({"from_version": 11}, "version 11, not 12"),
    ],
)
def test_an_upload_for_another_context_is_refused_with_its_reason(claim: dict, reason: str):
    other = dataclasses.replace(CONTEXT, **claim)
    sealed = seal(DELTA, other, COORDINATOR.public_key(), DEVICE)
    with pytest.raises(EnvelopeError, match=reason):
        _open(sealed, claimed=other)


def test_a_device_lying_about_its_context_fails_the_signature():
    # It sealed for round 2 but claims round 3: the coordinator checks against the info it rebuilt.
    sealed = seal(DELTA, dataclasses.replace(CONTEXT, round=2), COORDINATOR.public_key(), DEVICE)
    with pytest.raises(EnvelopeError, match="signature does not match"):
        _open(sealed)


@pytest.mark.parametrize(
    "damage",
    [
        lambda c: c[:-1],  # truncated
        lambda c: c[:100] + bytes([c[100] ^ 1]) + c[101:],  # one bit flipped
        lambda c: c + b"\0",  # padded
    ],
)
def test_a_damaged_ciphertext_is_refused(damage):
    sealed = seal(DELTA, CONTEXT, COORDINATOR.public_key(), DEVICE)
    with pytest.raises(EnvelopeError, match="truncated or altered"):
        _open(SealedUpload(damage(sealed.ciphertext), sealed.signature))


def test_another_devices_signature_is_refused():
    sealed = seal(DELTA, CONTEXT, COORDINATOR.public_key(), Ed25519PrivateKey.generate())
    with pytest.raises(EnvelopeError, match="signature does not match"):
        _open(sealed)


def test_an_upload_sealed_to_another_coordinator_does_not_decrypt():
    sealed = seal(DELTA, CONTEXT, X25519PrivateKey.generate().public_key(), DEVICE)
    with pytest.raises(EnvelopeError, match="does not decrypt"):
        _open(sealed)


def test_the_info_binds_every_field_canonically():
    assert CONTEXT.info() == (
        b'fleetlora/upload/v1:{"base_sha256":"' + b"ab" * 32 + b'","device_id":"kiosk-7",'
        b'"from_version":12,"round":3,"tenant":"acme"}'
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("device_id", ["kiosk-7"]),
        ("device_id", "x" * 257),
        ("round", "3"),
        ("round", True),
        ("from_version", 1.5),
    ],
)
def test_a_claim_of_the_wrong_type_or_size_is_malformed_before_anything_uses_it(field: str, value):
    arrays, config = to_records(seal(DELTA, CONTEXT, COORDINATOR.public_key(), DEVICE), CONTEXT)
    config[f"upload.{field}"] = value

    with pytest.raises(EnvelopeError, match="malformed sealed upload"):
        from_records(arrays, config)


def test_a_well_formed_claim_comes_back_as_it_was_sent():
    sealed = seal(DELTA, CONTEXT, COORDINATOR.public_key(), DEVICE)

    assert from_records(*to_records(sealed, CONTEXT)) == (sealed, CONTEXT)
