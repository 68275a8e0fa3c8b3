"""The benchmarks' upstream process: ``proxy.standins.openai.FastStandIn`` (vLLM's chat route at
zero latency, precomputed bodies, held streams for the memory benchmark) on 127.0.0.1.

Run: ``python -m bench.upstream --port 8001`` (uvloop when installed).
"""

from __future__ import annotations

import argparse
import asyncio
import resource

from aiohttp import web

from proxy.standins.openai import FastStandIn

HOST = "127.0.0.1"


def raise_fd_limit(wanted: int = 65536) -> int:
    """Raise this process's open-file limit towards ``wanted``; returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (wanted, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), max(hard, target)))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def serve(port: int) -> None:
    raise_fd_limit()
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is in the dev extra
        pass
    web.run_app(
        FastStandIn().app(),
        host=HOST,
        port=port,
        access_log=None,
        print=None,
        backlog=4096,
        handle_signals=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    serve(p.parse_args().port)


if __name__ == "__main__":
    main()
