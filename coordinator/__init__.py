"""The coordinator: runs rounds on Flower, aggregates deltas, versions every global adapter in SQL."""
