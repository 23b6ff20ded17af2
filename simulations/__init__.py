"""Whole fleets in one process, on the same ServerApp and ClientApp a deployment runs."""
