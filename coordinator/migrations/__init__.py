"""Alembic migrations of the coordinator database (``fleetlora coordinator db upgrade``)."""
