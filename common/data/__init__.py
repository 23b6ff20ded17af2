"""Text examples: reading them from files, the built-in corpus, and partitioning them over devices."""

from fleetlora.common.data.examples import Example, load_examples, split_holdout

__all__ = ["Example", "load_examples", "split_holdout"]
