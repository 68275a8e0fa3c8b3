"""wattproxy's benchmarks: ``python -m bench.run`` (``make bench``) measures the proxy against a
direct connection, a bare aiohttp pass-through and nginx, and writes BENCHMARKS.md.

Modules: ``upstream`` (a fast stand-in OpenAI server), ``bare_proxy`` (the floor of our own
stack), ``procs`` (server processes, pinning, /proc readings), ``wrk`` (load runs), ``clients``
(time to first streamed byte, 10,000 idle streams), ``ledger_trips`` (ledger round trips per
request), ``engine_scale`` (one attribution sample with 10,000 in flight),
``attribution_accuracy`` (work vs time weighting against a known truth), ``sse_parser`` (µs per
SSE event), ``workers`` (one and two worker processes side by side; ``python -m bench.workers``
alone), ``profiled_serve`` (``wattproxy serve`` with a cProfile switched by signals), ``run``
(the driver).
Everything listens and connects on 127.0.0.1 only.
"""
