"""Helpers for tests that need real local services (a private redis-server, the shared Redis)."""
