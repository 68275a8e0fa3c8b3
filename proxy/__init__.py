"""The HTTP side of wattproxy: the reverse proxy, identity, budgets, ledger, reports, metrics, CLI."""

__version__ = "0.1.0"
