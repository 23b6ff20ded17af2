"""The device's dynamic incremental corpus: ingest, de-duplicate, filter, store, label, watch for drift."""
