"""Defaults that the operator's command line shows in ``--help``, in a module that imports nothing.

They are declared in the options of ``fleetlora coordinator ...``, so they must be importable without
the modules that use them (SQLAlchemy, torch): those load only inside the command that runs.
"""

from __future__ import annotations

from datetime import timedelta

DEFAULT_DB = "sqlite:///fleetlora.db"  # the operator CLI's database when neither --db nor --config is given
DEFAULT_TTL = timedelta(days=7)  # how long devices accept an update package (PackagePolicy.ttl)
DEFAULT_MAX_ERROR = 0.10  # the largest reconstruction error a lossy package codec may cause
