"""The project's error hierarchy.

Every error a user can cause is a :class:`FleetloraError` whose message is one line saying
what was expected, what arrived, and what to do; the CLIs print it and exit non-zero.
"""

from __future__ import annotations


class FleetloraError(Exception):
    """Base class of all errors fleetlora raises on purpose."""


class ConfigError(FleetloraError, ValueError):
    """A setting is missing, out of range or inconsistent with another setting."""


class DataError(FleetloraError, ValueError):
    """A data file is missing, empty, or not in a shape fleetlora reads."""


class ModelError(FleetloraError):
    """A base model cannot be found or built."""


class IncompatibleStateError(FleetloraError, ValueError):
    """Adapter arrays do not match the model's trainable layout (names, shapes or dtypes)."""


class CorruptVersionError(FleetloraError):
    """Stored adapter bytes do not match their recorded sha256."""


class ConsentError(FleetloraError):
    """The device's owner has not allowed uploads; the device answers nothing but this."""


class QuorumError(FleetloraError):
    """Too few devices were online, or answered validly, before a round's deadline."""
