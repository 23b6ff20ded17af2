"""The contract the device and the coordinator share: models, deltas, records, config, data."""
