from collections import Counter

import pytest

from fleetlora.common.data.partition import PartitionScheme, partition_indices
from fleetlora.common.errors import ConfigError

LABELS = [f"c{i % 10}" for i in range(2000)]


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5"])
def test_every_example_lands_in_exactly_one_nonempty_part(spec: str):
    parts = partition_indices(LABELS, 20, PartitionScheme.parse(spec), seed=0)
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(len(LABELS)))
    assert all(parts)


def test_partitions_are_reproducible_and_seed_dependent():
    scheme = PartitionScheme.parse("dirichlet:0.5")
    assert partition_indices(LABELS, 5, scheme, seed=1) == partition_indices(LABELS, 5, scheme, seed=1)
    assert partition_indices(LABELS, 5, scheme, seed=1) != partition_indices(LABELS, 5, scheme, seed=2)


def test_small_alpha_skews_label_mix():
    def top_share(spec: str) -> float:
        parts = partition_indices(LABELS, 10, PartitionScheme.parse(spec), seed=0)
        shares = [Counter(LABELS[i] for i in p).most_common(1)[0][1] / len(p) for p in parts]
        return sum(shares) / len(shares)

    assert top_share("dirichlet:0.1") > 0.5 > top_share("iid")


@pytest.mark.parametrize("spec", ["", "dirichlet", "dirichlet:0", "dirichlet:-1", "dirichlet:x", "shards"])
def test_bad_scheme_is_refused(spec: str):
    with pytest.raises(ConfigError, match="iid' or 'dirichlet:ALPHA"):
        PartitionScheme.parse(spec)


def test_impossible_splits_are_refused():
    with pytest.raises(ConfigError, match="Cannot split 3 examples over 5 devices"):
        partition_indices(["a", "b", "c"], 5, PartitionScheme("iid"), seed=0)
    with pytest.raises(ConfigError, match="needs labelled data"):
        partition_indices([None] * 10, 2, PartitionScheme.parse("dirichlet:1"), seed=0)


def test_a_dirichlet_split_over_nearly_as_many_devices_as_examples_leaves_none_empty():
    # 1,000 devices of 2,000 examples: every draw leaves some device empty; each gets one from the largest.
    parts = partition_indices(LABELS, 1000, PartitionScheme.parse("dirichlet:1.0"), seed=1)
    assert all(parts) and sorted(i for part in parts for i in part) == list(range(len(LABELS)))
    assert parts == partition_indices(LABELS, 1000, PartitionScheme.parse("dirichlet:1.0"), seed=1)
