"""The HTTP side of wattproxy: the proxy, identity, budgets, ledger, reports, metrics, CLI."""

__version__ = "0.1.0"

__all__ = ["__version__"]
