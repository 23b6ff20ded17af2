import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch

from fleetlora.common.codec import LADDER, Codec, decode, encode, inflated_bound
from fleetlora.common.config import ModelSpec, to_config
from fleetlora.common.delta import apply_delta, diff
from fleetlora.common.errors import ConfigError, FleetloraError
from fleetlora.common.package import MAX_CAP, read_package
from fleetlora.coordinator.models import UpdatePackage
from fleetlora.coordinator.packages import PackagePolicy, PackageTooLarge, build_package
from fleetlora.coordinator.storage import NewVersion
from tests.client.update_harness import LINEAGE, TENANT, Fleet, make_fleet, states_equal


@pytest.fixture
def fleet(tmp_path: Path, tiny_spec: ModelSpec, db_url: str) -> Fleet:
    return make_fleet(tmp_path, tiny_spec, db_url)


def _cap_for(limit: int, base_bytes: int) -> float:
    """A cap whose ``int(cap × base_bytes)`` is exactly ``limit``."""
    cap = (limit + 0.5) / base_bytes
    assert int(cap * base_bytes) == limit
    return cap


def test_build_picks_lossless_codec_when_it_fits(fleet: Fleet):
    v0, v1, _ = fleet.versions
    for source in (None, v0.id):
        info = build_package(fleet.storage, v1.id, source, fleet.key, PackagePolicy())
        assert info.codec == "fp32+zstd"
        assert info.reconstruction_error == 0.0
        assert (info.from_version, info.to_version, info.sequence) == (source, v1.id, v1.id)
        assert info.cap == MAX_CAP and info.ratio <= MAX_CAP
        assert info.base_model_bytes == fleet.loaded.base_bytes
        blob = fleet.storage.packages.blob(info.id)
        assert len(blob) == info.package_bytes
        package = read_package(io.BytesIO(blob), fleet.public)
        manifest = package.manifest
        assert (manifest.tenant, manifest.lineage) == (TENANT, LINEAGE)
        assert manifest.base_sha256 == fleet.loaded.base_sha256
        assert (manifest.from_version, manifest.to_version, manifest.sequence) == (source, v1.id, v1.id)
        decoded = decode(package.payload, Codec.parse(manifest.codec), inflated_bound(fleet.adapters[1]))
        rebuilt = decoded if source is None else apply_delta(fleet.adapters[0], decoded)
        assert states_equal(rebuilt, fleet.adapters[1])
        assert fleet.storage.packages.find(v1.id, source) == info
    assert [p.from_version for p in fleet.storage.packages.all(LINEAGE)] == [None, v0.id]


def test_tight_cap_picks_a_lossier_codec(fleet: Fleet):
    _, v1, v2 = fleet.versions
    delta = diff(fleet.adapters[2], fleet.adapters[1])
    lossless = build_package(fleet.storage, v2.id, v1.id, fleet.key, PackagePolicy())
    overhead = lossless.package_bytes - len(encode(delta, LADDER[0]))  # header, manifest, signature
    encoded = {c.name: len(encode(delta, c)) for c in LADDER}
    # Room for the int8 package (manifests differ by a few bytes), not for fp16's or fp32's.
    limit = encoded["int8+zstd"] + overhead + 64
    assert limit < encoded["fp16+zstd"] + overhead - 64
    base = fleet.loaded.base_bytes
    info = build_package(fleet.storage, v2.id, v1.id, fleet.key, PackagePolicy(cap=_cap_for(limit, base)))
    assert info.codec == "int8+zstd"
    assert 0 < info.reconstruction_error < 2e-2
    assert info.package_bytes <= info.cap * base
    assert info.package_bytes < lossless.package_bytes
    package = read_package(io.BytesIO(fleet.storage.packages.blob(info.id)), fleet.public)
    assert package.manifest.reconstruction_error == info.reconstruction_error

    # Tighter still: a sparse codec, with a larger error, still under the cap.
    limit = encoded["int8+zstd+top0.25"] + overhead + 64
    assert limit < encoded["int8+zstd"] + overhead - 64
    loose = PackagePolicy(cap=_cap_for(limit, base), max_error=1.0)
    sparse = build_package(fleet.storage, v2.id, v1.id, fleet.key, loose)
    assert Codec.parse(sparse.codec).density < 1
    assert sparse.reconstruction_error > info.reconstruction_error
    assert sparse.package_bytes <= sparse.cap * base
    # find() gives the newest stored package for the step.
    assert fleet.storage.packages.find(v2.id, v1.id) == sparse
    # With an error bound below what the sparse codec costs, the same cap is refused.
    strict = PackagePolicy(cap=_cap_for(limit, base), max_error=sparse.reconstruction_error / 2)
    with pytest.raises(PackageTooLarge, match="reconstruction error"):
        build_package(fleet.storage, v2.id, v1.id, fleet.key, strict)


def test_cap_too_small_for_any_codec_stores_nothing(fleet: Fleet):
    _, v1, v2 = fleet.versions
    base = fleet.loaded.base_bytes
    with pytest.raises(PackageTooLarge) as caught:
        build_package(fleet.storage, v2.id, v1.id, fleet.key, PackagePolicy(cap=_cap_for(100, base)))
    message = str(caught.value)
    assert "100 bytes" in message and str(base) in message
    for codec in LADDER:
        assert codec.name in message
    assert fleet.storage.packages.all() == []
    assert fleet.storage.packages.find(v2.id, v1.id) is None


@pytest.mark.parametrize("cap", [0.0, -0.05, 0.1001, 0.5, 1.0])
def test_cap_outside_the_contract_is_refused(cap: float):
    with pytest.raises(ConfigError):
        PackagePolicy(cap=cap)


def test_policy_bounds():
    assert PackagePolicy(cap=MAX_CAP).cap == 0.10
    with pytest.raises(ConfigError):
        PackagePolicy(ttl=timedelta(0))
    with pytest.raises(ConfigError):
        PackagePolicy(ttl=timedelta(seconds=-1))


def test_find_ignores_expired_packages(fleet: Fleet):
    _, v1, v2 = fleet.versions
    built = datetime.now(UTC) - timedelta(days=10)
    old = build_package(
        fleet.storage, v2.id, v1.id, fleet.key, PackagePolicy(ttl=timedelta(days=7)), now=built
    )
    assert fleet.storage.packages.find(v2.id, v1.id) is None
    assert fleet.storage.packages.find(v2.id, v1.id, now=built + timedelta(days=1)) == old
    assert fleet.storage.packages.find(v2.id, v1.id, now=old.expires_at) is None
    fresh = build_package(fleet.storage, v2.id, v1.id, fleet.key, PackagePolicy())
    assert fleet.storage.packages.find(v2.id, v1.id) == fresh
    assert fleet.storage.packages.find(v2.id, None) is None  # another step: nothing stored
    assert len(fleet.storage.packages.all(LINEAGE)) == 2


def test_bytes_of_detects_a_corrupted_stored_package(fleet: Fleet):
    _, v1, v2 = fleet.versions
    info = build_package(fleet.storage, v2.id, v1.id, fleet.key, PackagePolicy())
    blob = fleet.storage.packages.blob(info.id)
    with fleet.storage.db.session() as session:
        row = session.get(UpdatePackage, info.id)
        row.package = blob[:-1] + bytes([blob[-1] ^ 0xFF])
    with pytest.raises(FleetloraError, match="sha256"):
        fleet.storage.packages.blob(info.id)
    with pytest.raises(FleetloraError):
        fleet.storage.packages.blob(info.id + 100)


def test_package_must_go_to_a_later_version_of_the_same_lineage(fleet: Fleet):
    v0, v1, v2 = fleet.versions
    with pytest.raises(ConfigError):
        build_package(fleet.storage, v1.id, v2.id, fleet.key, PackagePolicy())
    with pytest.raises(ConfigError):
        build_package(fleet.storage, v1.id, v1.id, fleet.key, PackagePolicy())

    def add(lineage: str):
        return fleet.storage.versions.add(
            NewVersion(
                lineage=lineage,
                parent_id=None,
                round=0,
                base_model_sha256=fleet.loaded.base_sha256,
                adapter={n: torch.zeros_like(t) for n, t in fleet.adapters[0].items()},
                participants={},
                metrics={},
            )
        )

    other = add("another-lineage")
    fleet.storage.versions.register_lineage(
        "another-lineage", TENANT, to_config(fleet.spec, "model"), fleet.loaded.base_sha256, 1
    )
    with pytest.raises(ConfigError):
        build_package(fleet.storage, other.id, v0.id, fleet.key, PackagePolicy())
    # A lineage without a model record cannot be packaged at all.
    with pytest.raises(FleetloraError, match="model record"):
        build_package(fleet.storage, add("unrecorded").id, None, fleet.key, PackagePolicy())
    assert fleet.storage.packages.all() == []
