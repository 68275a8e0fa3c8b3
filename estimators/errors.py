"""Errors of the energy side.

    EstimatorError
    ├── MeterError            a meter could not be opened or read
    │   └── MeterUnavailable  the backend is absent on this machine (no GPU, no powercap)
    └── CarbonError           a carbon-intensity provider failed (callers fall back to the table)

Vendor errors (pynvml, aiohttp client, OSError on sysfs) are translated into these at the
boundary, with ``raise ... from``.
"""

from __future__ import annotations


class EstimatorError(Exception):
    """Root of every error raised by the estimators package."""


class MeterError(EstimatorError):
    """A meter failed to open or to read one of its devices."""


class MeterUnavailable(MeterError):
    """The meter's backend does not exist on this machine."""


class CarbonError(EstimatorError):
    """A carbon-intensity provider failed to answer usably."""
