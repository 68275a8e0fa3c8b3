"""Stand-ins for hardware interfaces: the real API surface and units, with scripted values."""
