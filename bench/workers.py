"""``wattproxy serve`` with one and with two worker processes side by side (``listen.workers``).

Four proxies beside one bench upstream, each metered as ``bench.run`` meters (simulated meter,
SQLite ledger) unless noted:

    N = 1                  one process (``workers: 1``), pinned to CPU 1 as ``bench.run`` does
    N = 2                  the accounting process and two workers, allowed on both CPUs: on two
                           cores the load generator and the upstream need CPU too, so this is
                           the honest layout, not one core per worker
    N = 2, metering off    the same, ``meter.kind: none`` (ledger on tmpfs): metering on vs off
    N = 2, one CPU         the same processes held to CPU 1, the CPU N = 1 has: what splitting
                           the proxy into processes costs by itself

wrk (one thread, 32 connections, pinned to CPU 0 with the upstream and this driver, as
``bench.run``) drives each for non-streaming and SSE requests; the configurations take turns in
every round and each figure is the median over rounds. Around every run the CPU time of each
process is read from /proc: the ``wattproxy serve`` process (the accounting process; the whole
proxy for N = 1) apart from its children (the workers), and the upstream's, wrk's and the
machine's idle time, so a missed throughput target can be told from a machine without spare CPU.

Then time to the first streamed byte (N = 1 and N = 2 beside direct, everything on CPU 0 as in
``bench.run``), and one more N = 2 proxy whose accounting process runs under cProfile for each
request shape: events per request (``WorkerEvents.apply`` calls) and where its CPU goes. From the
measured per-worker and accounting CPU per request the section projects N = 8 and N = 32.

``python -m bench.workers`` prints the section; ``--into BENCHMARKS.md`` also puts it into that
file's results block (replacing an earlier one). ``make bench`` runs it as its last section.
Environment as ``bench.run`` (``BENCH_QUICK``, ``BENCH_ROUNDS``, ``BENCH_DURATION_S``,
``BENCH_TTFB_REQUESTS``, ``BENCH_PIN``).
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import clients
from bench.procs import HOST, Server, children, cpu_s, free_port, stop_all
from bench.run import (
    END_MARK,
    LOAD_CPU,
    PROXY_CPU,
    ROOT,
    START_MARK,
    Settings,
    _loadavg,
    log,
    wattproxy_argv,
    wattproxy_config,
)
from bench.wrk import PATH, run_wrk, write_script
from proxy.standins.openai import FAST_CHUNKS

HEADING = "### Workers: N = 1 and N = 2"
BOTH_CPUS = f"{LOAD_CPU},{PROXY_CPU}"
CONNECTIONS = 32
#: Events the proxy parses per SSE request: the content events, the usage event it asked for
#: (and strips) and ``[DONE]``.
SSE_EVENTS = FAST_CHUNKS + 2
#: The accounting process's events per non-streaming request: begin, first byte, end.
JSON_EVENTS = 3
#: Workers projected on paper.
PROJECTED = (1, 2, 8, 32)
#: Goals of issue 14, item 3.
SPEEDUP_GOAL = 1.7
ACCOUNTING_SHARE_GOAL = 0.25
ON_OFF_GOAL = 0.10
TTFB_GOAL_MS = 1.0
#: Added time to first byte that still counts as unchanged against N = 1.
TTFB_SAME_MS = 0.1

DIRECT = "direct"
N1 = "N = 1"
N2 = "N = 2"
N2_OFF = "N = 2, metering off"
N2_ONE = "N = 2, one CPU"
MODES = {"json": "non-streaming", "sse": f"SSE, {FAST_CHUNKS} chunks"}


@dataclass(frozen=True)
class Layout:
    """One proxy configuration and the CPUs its processes may run on."""

    name: str
    workers: int
    metered: bool
    cpus: str
    slug: str


LAYOUTS = (
    Layout(N1, 1, True, PROXY_CPU, "n1"),
    Layout(N2, 2, True, BOTH_CPUS, "n2"),
    Layout(N2_OFF, 2, False, BOTH_CPUS, "n2-off"),
    Layout(N2_ONE, 2, True, PROXY_CPU, "n2-one"),
)


# -- one measured run --------------------------------------------------------------------------


def machine_ticks() -> tuple[int, int, int]:
    """(all, idle, steal) clock ticks of the machine so far, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(values), values[3] + values[4], values[7]


def children_cpu_s() -> float:
    """CPU seconds of this driver's reaped children (wrk, once its run is over)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@dataclass(frozen=True)
class Sample:
    """One wrk run against one proxy: rates, and CPU µs per request of each process."""

    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    failed: int
    accounting_us: float  # the ``wattproxy serve`` process (the whole proxy for N = 1)
    workers_us: float  # its children, together
    worker_shares: tuple[float, ...]  # each worker's part of the workers' CPU
    upstream_us: float
    wrk_us: float
    idle: float  # share of the machine's CPU time idle during the run
    steal: float  # share taken by the hypervisor

    @property
    def proxy_us(self) -> float:
        return self.accounting_us + self.workers_us


@dataclass
class Proxy:
    layout: Layout
    port: int
    server: Server

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}{PATH}"

    @property
    def accounting_pid(self) -> int:
        return self.server.pids[0]

    @property
    def worker_pids(self) -> list[int]:
        return self.server.pids[1:]


def measure_run(proxy: Proxy, upstream: Server, script: Path, s: Settings) -> Sample:
    workers = proxy.worker_pids
    acc0, up0, wrk0 = cpu_s(proxy.accounting_pid), upstream.cpu_s(), children_cpu_s()
    w0 = [cpu_s(p) for p in workers]
    all0, idle0, steal0 = machine_ticks()
    r = run_wrk(proxy.url, script, CONNECTIONS, s.duration_s, s.cpu(LOAD_CPU))
    all1, idle1, steal1 = machine_ticks()
    w = [cpu_s(p) - c for p, c in zip(workers, w0, strict=True)]
    acc = cpu_s(proxy.accounting_pid) - acc0
    up, wrk = upstream.cpu_s() - up0, children_cpu_s() - wrk0
    n = max(r.requests, 1)
    ticks = max(all1 - all0, 1)
    return Sample(
        rps=r.rps,
        p50_ms=r.p50_ms,
        p99_ms=r.p99_ms,
        requests=r.requests,
        failed=r.errors + r.non2xx,
        accounting_us=acc / n * 1e6,
        workers_us=sum(w) / n * 1e6,
        worker_shares=tuple(x / sum(w) for x in w) if sum(w) > 0 else (),
        upstream_us=up / n * 1e6,
        wrk_us=wrk / n * 1e6,
        idle=(idle1 - idle0) / ticks,
        steal=(steal1 - steal0) / ticks,
    )


# -- summaries and projections (pure) ----------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """Medians over rounds of one (layout, mode)."""

    rps: float
    p50_ms: float
    accounting_us: float
    workers_us: float
    worker_shares: tuple[float, ...]
    upstream_us: float
    wrk_us: float
    idle: float
    steal: float
    failed: int

    @property
    def proxy_us(self) -> float:
        return self.accounting_us + self.workers_us

    @property
    def accounting_share(self) -> float:
        """The accounting process's CPU per request against a worker's (a worker's CPU per
        request it served: the workers' CPU over all requests)."""
        return self.accounting_us / self.workers_us if self.workers_us > 0 else float("nan")


def summarize(samples: Sequence[Sample]) -> Row:
    def med(pick: Callable[[Sample], float]) -> float:
        return statistics.median(pick(x) for x in samples)

    width = min(len(x.worker_shares) for x in samples)
    return Row(
        rps=med(lambda x: x.rps),
        p50_ms=med(lambda x: x.p50_ms),
        accounting_us=med(lambda x: x.accounting_us),
        workers_us=med(lambda x: x.workers_us),
        worker_shares=tuple(
            statistics.median(x.worker_shares[i] for x in samples) for i in range(width)
        ),
        upstream_us=med(lambda x: x.upstream_us),
        wrk_us=med(lambda x: x.wrk_us),
        idle=med(lambda x: x.idle),
        steal=med(lambda x: x.steal),
        failed=sum(x.failed for x in samples),
    )


@dataclass(frozen=True)
class Projection:
    """Requests/s of N workers on paper, from CPU µs per request measured with two.

    ``own_cores_rps``: each worker on a core of its own and the accounting process on another
    (min(N x a worker's rate, the accounting process's rate)); ``shared_cores_rps``: N cores
    for the workers and the accounting process together."""

    workers: int
    worker_rps: float  # N workers, the accounting process aside
    accounting_rps: float  # where the accounting process saturates
    own_cores_rps: float
    shared_cores_rps: float

    @property
    def limited_by(self) -> str:
        return "accounting process" if self.accounting_rps <= self.worker_rps else "workers"


def project(workers: int, worker_us: float, accounting_us: float) -> Projection:
    worker_rps = workers * 1e6 / worker_us
    accounting_rps = 1e6 / accounting_us
    shared = workers * 1e6 / (worker_us + accounting_us)
    return Projection(
        workers=workers,
        worker_rps=worker_rps,
        accounting_rps=accounting_rps,
        own_cores_rps=min(worker_rps, accounting_rps),
        shared_cores_rps=min(shared, accounting_rps),
    )


# -- the accounting process under cProfile -----------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """One N = 2 run with the accounting process under cProfile (its main thread: the SQLite
    writer thread is not profiled)."""

    mode: str
    requests: int
    events: int  # WorkerEvents.apply calls
    batches: int  # event lines decoded
    token_events: int
    by_file: list[tuple[str, float]]  # own time share per source file
    by_function: list[tuple[str, float]]

    @property
    def events_per_request(self) -> float:
        return self.events / max(self.requests, 1)

    @property
    def batches_per_request(self) -> float:
        return self.batches / max(self.requests, 1)


def _short(path: str) -> str:
    """A source file as the tables name it: relative to the repository, to site-packages or
    to the standard library; ``~`` (C functions) as "built-ins"."""
    if path == "~":
        return "built-ins (C)"
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1]
    root = str(ROOT) + "/"
    if path.startswith(root):
        return path[len(root) :]
    m = re.search(r"/lib/python3[.0-9]*/(.+)$", path)
    return m.group(1) if m else path


def read_profile(path: Path, mode: str, top: int = 12) -> Profile:
    """The stats of one profiled run; its requests are the ``Accountant.begin`` calls (an
    accounting process slowed by the profiler may not have read every event by the end)."""
    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.values()) or 1.0
    files: dict[str, float] = {}
    funcs: list[tuple[str, float]] = []
    calls = {"apply": 0, "decode": 0, "tokens": 0, "begin": 0}
    for (filename, line, name), (_, nc, tt, _, _) in stats.items():
        where = _short(filename)
        files[where] = files.get(where, 0.0) + tt
        funcs.append((f"{where}:{line}({name})", tt))
        if where.endswith("proxy/workers/hub.py") and name == "apply":
            calls["apply"] += nc
        elif where.endswith("proxy/workers/events.py") and name == "decode":
            calls["decode"] += nc
        elif where.endswith("proxy/accounting.py") and name in ("tokens", "begin"):
            calls[name] += nc
    ranked = sorted(files.items(), key=lambda kv: -kv[1])[:top]
    funcs.sort(key=lambda kv: -kv[1])
    return Profile(
        mode=mode,
        requests=calls["begin"],
        events=calls["apply"],
        batches=calls["decode"],
        token_events=calls["tokens"],
        by_file=[(f, t / total) for f, t in ranked],
        by_function=[(f, t / total) for f, t in funcs[:top]],
    )


def profiled_run(
    folder: Path, upstream_port: int, script: Path, mode: str, s: Settings, servers: list[Server]
) -> Profile:
    """A fresh N = 2 proxy whose ``wattproxy serve`` process (the accounting process) runs
    under ``bench.profiled_serve``: warmed up, then profiled for one wrk run."""
    layout = Layout(N2, 2, True, BOTH_CPUS, f"profile-{mode}")
    out = folder / f"accounting-{mode}.prof"
    argv = [sys.executable, "-m", "bench.profiled_serve", str(out), *wattproxy_argv()[-2:]]
    proxy = start_proxy(folder, layout, upstream_port, s, servers, argv)
    run_wrk(proxy.url, script, 8, 1, s.cpu(LOAD_CPU))
    os.kill(proxy.accounting_pid, signal.SIGUSR1)
    time.sleep(0.3)  # the handler runs at the process's next bytecode (the sampler: 100 ms)
    run_wrk(proxy.url, script, CONNECTIONS, s.duration_s, s.cpu(LOAD_CPU))
    os.kill(proxy.accounting_pid, signal.SIGUSR2)
    deadline = time.monotonic() + 30
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    proxy.server.stop()
    return read_profile(out, mode)


@dataclass(frozen=True)
class PerfProfile:
    """``perf record`` of the accounting process (every thread) during one SSE run: where its
    CPU goes below Python (Python 3.11 shows no Python frames to perf)."""

    samples: int
    main_thread: float  # share of samples in the event loop's thread
    by_dso: list[tuple[str, float]]
    by_symbol: list[tuple[str, float]]


def _perf_shares(data: Path, key: str, top: int) -> list[tuple[str, float]]:
    out = subprocess.run(
        ["perf", "report", "-i", str(data), "--stdio", "--no-children", "-g", "none", "-s", key],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    ).stdout
    rows = []
    for line in out.splitlines():
        m = re.match(r"\s*([0-9.]+)%\s+(.+?)\s*$", line)
        if m and not line.lstrip().startswith("#"):
            rows.append((m.group(2), float(m.group(1)) / 100))
    return rows[:top]


def perf_run(proxy: Proxy, script: Path, s: Settings, folder: Path) -> PerfProfile | None:
    """One SSE run with ``perf record`` on the accounting process; None without perf."""
    perf = shutil.which("perf")
    if perf is None:
        return None
    data = folder / "accounting.perf"
    pid, span = str(proxy.accounting_pid), f"{s.duration_s:g}"
    rec = subprocess.Popen(
        [perf, "record", "-F", "999", "-p", pid, "-o", str(data), "--", "sleep", span],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.3)
    run_wrk(proxy.url, script, CONNECTIONS, s.duration_s, s.cpu(LOAD_CPU))
    if rec.wait(timeout=60) != 0 or not data.exists():
        return None
    tids = subprocess.run(
        [perf, "script", "-i", str(data), "-F", "tid"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    ).stdout.split()
    main = sum(1 for x in tids if x == str(proxy.accounting_pid))
    symbols = [
        (name.removeprefix("[.] ").removeprefix("[k] "), share)
        for name, share in _perf_shares(data, "sym", 10)
    ]
    return PerfProfile(
        samples=len(tids),
        main_thread=main / max(len(tids), 1),
        by_dso=_perf_shares(data, "dso", 6),
        by_symbol=symbols,
    )


# -- servers -----------------------------------------------------------------------------------


def proxy_config(folder: Path, layout: Layout, port: int, upstream_port: int) -> Path:
    path = wattproxy_config(folder, layout.slug, port, upstream_port, layout.metered)
    doc = json.loads(path.read_text())
    doc["listen"]["workers"] = layout.workers
    path.write_text(json.dumps(doc, indent=2))
    return path


def start_proxy(
    folder: Path,
    layout: Layout,
    upstream_port: int,
    s: Settings,
    servers: list[Server],
    argv: list[str] | None = None,
) -> Proxy:
    port = free_port()
    cfg = proxy_config(folder, layout, port, upstream_port)
    server = Server(
        layout.name,
        [*(argv or wattproxy_argv()), "serve", "--config", str(cfg)],
        f"http://{HOST}:{port}/healthz",
        folder / f"{layout.slug}.log",
    )
    server.start(s.cpu(layout.cpus), env={**os.environ, "PYTHONPATH": str(ROOT)})
    servers.append(server)
    server.wait_ready()
    if layout.workers > 1:
        wait_workers(server, layout.workers)
    return Proxy(layout, port, server)


def wait_workers(server: Server, count: int, timeout_s: float = 60.0) -> None:
    """Every worker started (the first one may answer before the others run)."""
    pid = server.pids[0]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = children(pid)
        if len(found) >= count:
            server.pids = [pid, *sorted(found)]
            return
        time.sleep(0.2)
    raise RuntimeError(f"{server.name}: {count} workers not started: {server.log_tail()}")


def start_upstream(folder: Path, s: Settings, servers: list[Server]) -> tuple[int, Server]:
    port = free_port()
    upstream = Server(
        "upstream",
        [sys.executable, "-m", "bench.upstream", "--port", str(port)],
        f"http://{HOST}:{port}/health",
        folder / "workers-upstream.log",
    )
    upstream.start(s.cpu(LOAD_CPU), env={**os.environ, "PYTHONPATH": str(ROOT)})
    servers.append(upstream)
    upstream.wait_ready()
    return port, upstream


# -- the whole measurement ---------------------------------------------------------------------


@dataclass
class WorkersResult:
    settings: Settings
    rows: dict[tuple[str, str], Row]
    ttfb_ms: dict[str, list[float]]
    profiles: list[Profile]
    perf: PerfProfile | None
    load_before: str
    load_after: str
    restarted: list[str] = field(default_factory=list)
    when: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M"))


def throughput(
    proxies: Sequence[Proxy], upstream: Server, folder: Path, s: Settings
) -> dict[tuple[str, str], list[Sample]]:
    scripts = {mode: write_script(folder, mode == "sse") for mode in MODES}
    for p in proxies:
        for script in scripts.values():
            run_wrk(p.url, script, 8, 1, s.cpu(LOAD_CPU))
    samples: dict[tuple[str, str], list[Sample]] = {}
    for rnd in range(s.rounds):
        order = list(proxies[rnd % len(proxies) :]) + list(proxies[: rnd % len(proxies)])
        for mode, script in scripts.items():
            for p in order:
                x = measure_run(p, upstream, script, s)
                samples.setdefault((p.layout.name, mode), []).append(x)
                if x.failed:
                    log(f"workers: {p.layout.name} {mode}: {x.failed} failed requests")
            log(f"workers: round {rnd + 1}/{s.rounds}, {mode} done")
    return samples


def measure(
    s: Settings,
    folder: Path,
    servers: list[Server],
    upstream: tuple[int, Server] | None = None,
    layouts: Iterable[Layout] = LAYOUTS,
) -> WorkersResult:
    """Start the proxies (and an upstream unless given), measure, stop the proxies."""
    load_before = _loadavg()
    up_port, up = upstream or start_upstream(folder, s, servers)
    proxies = [start_proxy(folder, layout, up_port, s, servers) for layout in layouts]
    log("workers: " + ", ".join(f"{p.layout.name} pids {p.server.pids}" for p in proxies))
    samples = throughput(proxies, up, folder, s)
    restarted = [
        p.layout.name
        for p in proxies
        if p.layout.workers > 1 and sorted(children(p.accounting_pid)) != p.worker_pids
    ]
    log("workers: time to first streamed byte")
    ttfb_targets = {p.layout.name: p for p in proxies if p.layout.name in (N1, N2)}
    for p in ttfb_targets.values():
        p.server.pin(s.cpu(LOAD_CPU))
    ttfb = clients.time_to_first_event(
        {DIRECT: up_port, **{name: p.port for name, p in ttfb_targets.items()}},
        s.ttfb_requests,
        rounds=5,
    )
    perf = None
    n2 = ttfb_targets.get(N2)
    if n2 is not None:
        log("workers: the accounting process under perf (SSE)")
        n2.server.pin(s.cpu(BOTH_CPUS))
        perf = perf_run(n2, write_script(folder, True), s, folder)
    for p in proxies:
        p.server.stop()
    log("workers: the accounting process under cProfile")
    profiles = [
        profiled_run(folder, up_port, write_script(folder, mode == "sse"), mode, s, servers)
        for mode in MODES
    ]
    return WorkersResult(
        settings=s,
        rows={key: summarize(v) for key, v in samples.items()},
        ttfb_ms={k: [t * 1e3 for t in v] for k, v in ttfb.items()},
        profiles=profiles,
        perf=perf,
        load_before=load_before,
        load_after=_loadavg(),
        restarted=restarted,
    )


# -- report ------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{x * 100:.0f} %"


def _verdict(ok: bool, detail: str) -> str:
    return ("met" if ok else "missed") + f" ({detail})"


def _split(shares: tuple[float, ...]) -> str:
    return "/".join(f"{x * 100:.0f}" for x in shares) if len(shares) > 1 else "-"


def render(res: WorkersResult) -> str:
    s, rows = res.settings, res.rows
    cpus = {layout.name: layout.cpus for layout in LAYOUTS}
    steal = statistics.median(r.steal for r in rows.values())
    out = [HEADING, ""]
    out += [
        f"_Measured on {res.when} (`bench/workers.py`): "
        f"{'quick (BENCH_QUICK=1)' if s.quick else 'full'}, {s.rounds} round(s) of "
        f"{s.duration_s:g} s per configuration and shape, configurations alternating; medians "
        f"over rounds; load average before {res.load_before}, after {res.load_after}._",
        "",
        "Layout: wrk (one thread, 32 connections), the upstream and the driver on CPU "
        f"{LOAD_CPU}, as in the sections above. N = 1 is one process on CPU {PROXY_CPU}, as "
        f"`wattproxy` above. N = 2 (the accounting process and two workers) may run on both "
        f"CPUs ({BOTH_CPUS}): a second core for the proxy exists on this machine only beside "
        "the load generator and the upstream, which need CPU too. N = 2, one CPU: the same "
        f"three processes held to CPU {PROXY_CPU}, the CPU N = 1 has."
        if s.pin
        else "Layout: nothing pinned (BENCH_PIN=0).",
        "",
        "| mode | configuration | CPUs | req/s | p50 ms | CPU µs/req: accounting process | "
        "workers | proxy | accounting / a worker's | workers' split % | upstream µs/req | "
        "wrk µs/req | machine idle |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for mode, label in MODES.items():
        for layout in LAYOUTS:
            r = rows.get((layout.name, mode))
            if r is None:
                continue
            one = layout.workers == 1
            out.append(
                f"| {label} | {layout.name} | {cpus[layout.name] if s.pin else 'any'} | "
                f"{r.rps:,.0f} | {r.p50_ms:.1f} | "
                f"{r.accounting_us:.0f}{' (one process)' if one else ''} | "
                f"{'-' if one else f'{r.workers_us:.0f}'} | {r.proxy_us:.0f} | "
                f"{'-' if one else _pct(r.accounting_share)} | {_split(r.worker_shares)} | "
                f"{r.upstream_us:.0f} | {r.wrk_us:.0f} | {_pct(r.idle)} |"
            )
    out += [
        "",
        "CPU µs/req: CPU time (/proc, user + system, every thread) per request: the "
        "`wattproxy serve` process (the accounting process; for N = 1 the whole proxy), its "
        "children (the workers) together, and both. A worker's CPU per request it serves is the "
        "workers' figure. Machine idle: the share of both CPUs' time idle during the runs "
        f"(hypervisor steal, median: {_pct(steal)}).",
        "",
    ]
    # µs per SSE event
    out += [
        f"µs per SSE event ({SSE_EVENTS} events per request: {FAST_CHUNKS} content events, the "
        "usage event the proxy asks for and strips, `[DONE]`): the proxy's CPU per SSE "
        "request over its events, and the part above a non-streaming request.",
        "",
        "| configuration | all in, µs per event | above non-streaming, µs per event | "
        "of which the accounting process |",
        "|---|---:|---:|---:|",
    ]
    for layout in LAYOUTS:
        sse, js = rows.get((layout.name, "sse")), rows.get((layout.name, "json"))
        if sse is None or js is None:
            continue
        acc = (
            "-"
            if layout.workers == 1
            else f"{(sse.accounting_us - js.accounting_us) / SSE_EVENTS:.2f}"
        )
        out.append(
            f"| {layout.name} | {sse.proxy_us / SSE_EVENTS:.1f} | "
            f"{(sse.proxy_us - js.proxy_us) / SSE_EVENTS:.1f} | {acc} |"
        )
    out.append("")
    # time to first byte
    med = {k: statistics.median(v) for k, v in res.ttfb_ms.items()}
    out += [
        "Time to first streamed byte: "
        f"{len(next(iter(res.ttfb_ms.values())))} streaming requests per target over one "
        f"keep-alive connection, interleaved, every proxy process moved to CPU {LOAD_CPU} "
        "with the rest (the latency layout of `bench.run`).",
        "",
        "| target | median ms | p90 ms | added vs direct (median) ms |",
        "|---|---:|---:|---:|",
    ]
    for name, values in res.ttfb_ms.items():
        p90 = statistics.quantiles(values, n=10)[-1]
        out.append(f"| {name} | {med[name]:.3f} | {p90:.3f} | {med[name] - med[DIRECT]:+.3f} |")
    out.append("")
    out += targets(res, med)
    out += projections(res)
    out += profile_tables(res.profiles)
    if res.perf is not None:
        out += perf_table(res.perf)
    if res.restarted:
        out += [f"Warning: a worker was restarted during the runs of {', '.join(res.restarted)}."]
        out.append("")
    return "\n".join(out)


def machine_ceiling_rps(row: Row, cores: int = 2) -> float:
    """Requests/s the whole machine could serve at the CPU per request of the proxy, the
    upstream and wrk together (all of them run on its ``cores``)."""
    return cores * 1e6 / (row.proxy_us + row.upstream_us + row.wrk_us)


def targets(res: WorkersResult, ttfb_med: dict[str, float]) -> list[str]:
    rows = res.rows
    out = ["Targets (issue 14, item 3):", ""]
    out += ["| target | goal | measured | verdict |", "|---|---|---|---|"]
    n1, n2 = rows.get((N1, "sse")), rows.get((N2, "sse"))
    j1, j2 = rows.get((N1, "json")), rows.get((N2, "json"))
    if n1 and n2 and j1 and j2:
        speed, jspeed = n2.rps / n1.rps, j2.rps / j1.rps
        ceiling = machine_ceiling_rps(n2) / n1.rps
        out.append(
            f"| SSE throughput, N = 2 / N = 1 | >= {SPEEDUP_GOAL:g}x | x{speed:.2f} "
            f"({n2.rps:,.0f} vs {n1.rps:,.0f} req/s; non-streaming x{jspeed:.2f}); machine "
            f"idle {_pct(n2.idle)} during N = 2's runs; the machine's ceiling x{ceiling:.2f} "
            "(two cores over proxy + upstream + wrk CPU per request) | "
            f"{_verdict(speed >= SPEEDUP_GOAL, f'{speed - SPEEDUP_GOAL:+.2f} vs goal')} |"
        )
    for mode, label in MODES.items():
        r = rows.get((N2, mode))
        if r is None:
            continue
        out.append(
            f"| accounting process CPU per request / a worker's, {label}, N = 2 | "
            f"<= {_pct(ACCOUNTING_SHARE_GOAL)} | {r.accounting_us:.0f} / {r.workers_us:.0f} µs: "
            f"{_pct(r.accounting_share)} | "
            + _verdict(
                r.accounting_share <= ACCOUNTING_SHARE_GOAL,
                f"{(r.accounting_share - ACCOUNTING_SHARE_GOAL) * 100:+.0f} points vs goal",
            )
            + " |"
        )
    on_off = [
        (rows[(N2, m)], rows[(N2_OFF, m)]) for m in MODES if (N2, m) in rows and (N2_OFF, m) in rows
    ]
    if len(on_off) == len(MODES):
        cpu = [on.proxy_us / off.proxy_us for on, off in on_off]
        rps = [on.rps / off.rps for on, off in on_off]
        worst = max(abs(x - 1) for x in cpu)
        out.append(
            f"| metering on vs off, N = 2 | within {_pct(ON_OFF_GOAL)} | CPU per request "
            f"x{cpu[0]:.2f} non-streaming, x{cpu[1]:.2f} SSE; req/s {_pct(rps[0])} and "
            f"{_pct(rps[1])} of metering off | "
            f"{_verdict(worst <= ON_OFF_GOAL, f'worst {_pct(worst)} apart')} |"
        )
    if N1 in ttfb_med and N2 in ttfb_med:
        a1, a2 = ttfb_med[N1] - ttfb_med[DIRECT], ttfb_med[N2] - ttfb_med[DIRECT]
        out.append(
            f"| added time to first streamed byte, N = 2 | <= {TTFB_GOAL_MS:g} ms | "
            f"{a2:.2f} ms | "
            f"{_verdict(a2 <= TTFB_GOAL_MS, f'{a2 - TTFB_GOAL_MS:+.2f} ms vs goal')} |"
        )
        out.append(
            f"| added time to first streamed byte, N = 2 vs N = 1 | unchanged (within "
            f"{TTFB_SAME_MS:g} ms) | {a2:.2f} vs {a1:.2f} ms | "
            f"{_verdict(a2 - a1 <= TTFB_SAME_MS, f'{a2 - a1:+.2f} ms')} |"
        )
    out.append("")
    return out


def projections(res: WorkersResult) -> list[str]:
    events = {p.mode: p.events_per_request for p in res.profiles}
    out = [
        "On paper, from N = 2's CPU per request (metered): a worker's rate is 1 / (workers' "
        "µs per request), the accounting process's 1 / (its µs per request); one core per "
        "worker plus one for the accounting process gives min(N x a worker's rate, the "
        "accounting process's rate); N cores for all of them gives min(N / (workers' + "
        "accounting µs), the accounting process's rate). The load generator and the upstream "
        "are elsewhere.",
        "",
        "| mode | N | workers' rate, req/s | accounting process saturates at, req/s | "
        "events/s there | N + 1 cores, req/s | N cores, req/s | bound by |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for mode, label in MODES.items():
        r = res.rows.get((N2, mode))
        if r is None:
            continue
        per_req = events.get(mode, float(JSON_EVENTS) if mode == "json" else float("nan"))
        for n in PROJECTED:
            p = project(n, r.workers_us, r.accounting_us)
            out.append(
                f"| {label} | {n} | {p.worker_rps:,.0f} | {p.accounting_rps:,.0f} | "
                f"{p.accounting_rps * per_req:,.0f} | {p.own_cores_rps:,.0f} | "
                f"{p.shared_cores_rps:,.0f} | {p.limited_by} |"
            )
    out += [
        "",
        "Events per request (the accounting process's `WorkerEvents.apply` calls in the "
        "cProfile runs below): "
        + "; ".join(
            f"{MODES[p.mode]} {p.events_per_request:.2f} in {p.batches_per_request:.2f} "
            f"batch lines ({p.token_events / max(p.requests, 1):.2f} token events)"
            for p in res.profiles
        )
        + ".",
        "",
    ]
    return out


def profile_tables(profiles: Sequence[Profile]) -> list[str]:
    out: list[str] = []
    for p in profiles:
        out += [
            f"The accounting process under cProfile, {MODES[p.mode]}, N = 2, 32 connections "
            f"({p.requests:,} requests begun while profiled; main thread only, the SQLite writer "
            "thread apart; cProfile slows Python code, so shares, not µs): own time by file, "
            "and the top functions.",
            "",
            "| file | own time | | function | own time |",
            "|---|---:|---|---|---:|",
        ]
        for i in range(max(len(p.by_file), len(p.by_function))):
            f = p.by_file[i] if i < len(p.by_file) else ("", 0.0)
            g = p.by_function[i] if i < len(p.by_function) else ("", 0.0)
            out.append(f"| `{f[0]}` | {_pct(f[1])} | | `{g[0]}` | {_pct(g[1])} |")
        out.append("")
    return out


def perf_table(p: PerfProfile) -> list[str]:
    out = [
        f"The accounting process under `perf record` (999 Hz, every thread), SSE, N = 2, 32 "
        f"connections: {p.samples:,} samples, {_pct(p.main_thread)} in the event loop's "
        "thread (the rest: the SQLite writer thread and short-lived helper threads).",
        "",
        "| library | share | | symbol | share |",
        "|---|---:|---|---|---:|",
    ]
    for i in range(max(len(p.by_dso), len(p.by_symbol))):
        d = p.by_dso[i] if i < len(p.by_dso) else ("", 0.0)
        y = p.by_symbol[i] if i < len(p.by_symbol) else ("", 0.0)
        out.append(
            f"| {'`' + d[0] + '`' if d[0] else ''} | {_pct(d[1]) if d[0] else ''} | | "
            f"`{y[0]}` | {y[1] * 100:.1f} % |"
        )
    out.append("")
    return out


def insert_section(path: Path, section: str) -> None:
    """Put ``section`` into the results block of ``path``, replacing an earlier one."""
    text = path.read_text("utf-8")
    if START_MARK not in text or END_MARK not in text:
        raise SystemExit(f"{path} has no results block ({START_MARK} ... {END_MARK})")
    head, rest = text.split(START_MARK, 1)
    block, tail = rest.split(END_MARK, 1)
    if HEADING in block:
        before, after = block.split(HEADING, 1)
        nxt = after.find("\n### ")
        block = before + (after[nxt + 1 :] if nxt >= 0 else "")
    block = block.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n\n"
    path.write_text(head + START_MARK + block + END_MARK + tail, "utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--into", type=Path, help="also put the section into this file's results")
    args = ap.parse_args(argv)
    s = Settings.from_env(dict(os.environ))
    if shutil.which("wrk") is None:
        print("bench: wrk is not installed (run scripts/ensure-bench-tools.sh)", file=sys.stderr)
        return 1
    if s.pin:
        os.sched_setaffinity(0, {int(LOAD_CPU)})
    folder = Path(tempfile.mkdtemp(prefix="wattproxy-bench-"))
    servers: list[Server] = []
    try:
        section = render(measure(s, folder, servers))
    finally:
        stop_all(servers)
        for db in Path("/dev/shm").glob(f"{folder.name}-*"):
            db.unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
    print(section)
    if args.into is not None:
        insert_section(args.into, section)
        log(f"workers: wrote the section into {args.into}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
