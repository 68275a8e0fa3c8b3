"""Several worker processes on one port (``listen.workers``): each accepts connections
(``SO_REUSEPORT``), relays answers and parses usage; one accounting process owns the meter, the
attribution engine, the ledger writer, the budgets and ``/metrics``.

    events.py      the request events a worker sends (pure: encode, decode)
    remote.py      a worker's side: the batched event channel, ``RemoteAccountant``,
                   the budget check and the passed-on endpoints
    hub.py         the accounting process's side: events into the ``Accountant``; a worker
                   that is gone has its requests closed as ``proxy_restart``
    worker.py      a worker process (``python -m proxy.workers.worker``)
    supervisor.py  the accounting process: starts, restarts, reloads and drains the workers

Every request on the node still ends in one attribution engine, so the conservation of energy
holds as with one process; see docs/performance.md ("Workers").
"""

from proxy.workers.supervisor import Supervisor, resolve_workers

__all__ = ["Supervisor", "resolve_workers"]
