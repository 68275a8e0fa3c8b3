"""The per-user ledger: one interface, a backend per URL scheme, a batching writer in front."""

from proxy.ledger.base import AggregateRow, Ledger, open_ledger

__all__ = ["AggregateRow", "Ledger", "open_ledger"]
