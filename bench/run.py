"""``make bench``: wattproxy against a direct connection, a bare aiohttp pass-through and nginx.

Every server is its own process on 127.0.0.1: the stand-in upstream (``bench.upstream``),
``wattproxy serve`` with full metering (simulated meter, SQLite ledger in a temp dir,
Prometheus ``/metrics``), the same binary with metering off (``meter.kind: none``, ledger on
tmpfs: there is no switch to turn the ledger off), ``bench.bare_proxy`` and nginx when
installed. wrk drives each for non-streaming and SSE requests at 1 and 32 connections; the
configurations take turns in every round and each figure is the median over rounds. On two
cores the proxy under test gets CPU 1 to itself, and wrk, the upstream and this driver share CPU
0 (``BENCH_PIN=0`` turns pinning off).

Then: time to the first streamed byte (a Python client over many requests), 10,000 idle
streams held open through wattproxy (RSS per stream, RSS after they close), ledger round trips
per request, one attribution sample with 10,000 requests in flight, the work vs time
weighting accuracy, µs of parsing per SSE event (``bench.sse_parser``: the chunk path
against the per-event path), and wattproxy with one and two worker processes side by side
(``bench.workers``). Results are printed and written to BENCHMARKS.md between its markers.

Environment: ``BENCH_QUICK=1`` (about a minute), ``BENCH_ROUNDS``, ``BENCH_DURATION_S``,
``BENCH_STREAMS``, ``BENCH_PIN``, ``BENCH_WORKERS=0`` (no workers section), ``BENCH_OUT``
(default BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench import attribution_accuracy, clients, engine_scale, ledger_trips, sse_parser
from bench.procs import HOST, Server, free_port, nofile_limit, stop_all
from bench.wrk import PATH, WrkResult, run_wrk, write_script
from estimators.attribution import Weighting

ROOT = Path(__file__).resolve().parent.parent
START_MARK = "<!-- bench:results:start -->"
END_MARK = "<!-- bench:results:end -->"
LOAD_CPU = "0"  # wrk, the upstream, this driver
PROXY_CPU = "1"  # the proxy under test

DIRECT = "direct"
WATTPROXY = "wattproxy"
UNMETERED = "wattproxy, metering off"
BARE = "bare aiohttp"
NGINX = "nginx"


@dataclass(frozen=True)
class Settings:
    quick: bool
    rounds: int
    duration_s: float
    connections: tuple[int, ...]
    ttfb_requests: int
    streams: int
    ledger_requests: int
    pin: bool
    out: Path
    workers: bool = True  # the "Workers: N = 1 and N = 2" section (bench.workers)

    @classmethod
    def from_env(cls, env: dict[str, str]) -> Settings:
        quick = env.get("BENCH_QUICK", "") not in ("", "0")
        return cls(
            quick=quick,
            rounds=int(env.get("BENCH_ROUNDS", 1 if quick else 3)),
            duration_s=float(env.get("BENCH_DURATION_S", 2 if quick else 5)),
            connections=(1, 32),
            ttfb_requests=int(env.get("BENCH_TTFB_REQUESTS", 200 if quick else 1500)),
            streams=int(env.get("BENCH_STREAMS", 2000 if quick else 10_000)),
            ledger_requests=int(env.get("BENCH_LEDGER_REQUESTS", 500 if quick else 3000)),
            pin=env.get("BENCH_PIN", "1") != "0" and shutil.which("taskset") is not None,
            out=Path(env.get("BENCH_OUT", str(ROOT / "BENCHMARKS.md"))),
            workers=env.get("BENCH_WORKERS", "1") != "0",
        )

    def cpu(self, which: str) -> str | None:
        return which if self.pin else None


@dataclass
class Target:
    name: str
    port: int
    server: Server  # the process whose CPU time is charged to this target

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}{PATH}"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- servers -----------------------------------------------------------------------------------


def wattproxy_argv() -> list[str]:
    script = Path(sys.executable).parent / "wattproxy"
    if script.exists():
        return [str(script), "--log-level", "warning"]
    return [sys.executable, "-m", "proxy.cli", "--log-level", "warning"]


def wattproxy_config(folder: Path, name: str, port: int, upstream_port: int, metered: bool) -> Path:
    ledger_dir = folder if metered else Path("/dev/shm") if Path("/dev/shm").is_dir() else folder
    doc = {
        "listen": {"host": HOST, "port": port},
        "upstreams": [
            {"name": "llm", "url": f"http://{HOST}:{upstream_port}", "max_connections": 20000}
        ],
        "meter": {"kind": "simulated", "interval_ms": 100} if metered else {"kind": "none"},
        "ledger": {
            "url": f"sqlite:///{ledger_dir / (folder.name + '-' + name + '.db')}",
            "spool_path": str(folder / f"{name}-spool.jsonl"),
        },
    }
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps(doc, indent=2))  # JSON is YAML
    return path


def nginx_config(folder: Path, port: int, upstream_port: int) -> Path | None:
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        return None
    prefix = folder / "nginx"
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    text = (Path(__file__).with_name("nginx.conf.tmpl")).read_text()
    conf = prefix / "nginx.conf"
    conf.write_text(
        text.replace("{prefix}", str(prefix))
        .replace("{port}", str(port))
        .replace("{upstream_port}", str(upstream_port))
        # as root, workers would otherwise run as nobody, locked out of the private prefix
        .replace("{user_line}", "user root;" if os.geteuid() == 0 else "")
    )
    return conf


def start_servers(folder: Path, s: Settings, servers: list[Server]) -> dict[str, Target]:
    py = sys.executable
    up_port = free_port()
    upstream = Server(
        "upstream",
        [py, "-m", "bench.upstream", "--port", str(up_port)],
        f"http://{HOST}:{up_port}/health",
        folder / "upstream.log",
    )
    targets = {DIRECT: Target(DIRECT, up_port, upstream)}
    plan: list[tuple[str, Server]] = [(DIRECT, upstream)]
    for name, metered in ((WATTPROXY, True), (UNMETERED, False)):
        port = free_port()
        slug = "metered" if metered else "unmetered"
        cfg = wattproxy_config(folder, slug, port, up_port, metered)
        server = Server(
            name,
            [*wattproxy_argv(), "serve", "--config", str(cfg)],
            f"http://{HOST}:{port}/healthz",
            folder / f"{slug}.log",
        )
        plan.append((name, server))
        targets[name] = Target(name, port, server)
    port = free_port()
    bare = Server(
        BARE,
        [
            py,
            "-m",
            "bench.bare_proxy",
            "--port",
            str(port),
            "--upstream",
            f"http://{HOST}:{up_port}",
        ],
        f"http://{HOST}:{port}/health",
        folder / "bare.log",
    )
    plan.append((BARE, bare))
    targets[BARE] = Target(BARE, port, bare)
    port = free_port()
    conf = nginx_config(folder, port, up_port)
    if conf is not None:
        nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
        argv = [
            nginx_bin,
            "-p",
            str(conf.parent),
            "-c",
            str(conf),
            "-e",
            str(conf.parent / "e.log"),
        ]
        server = Server(NGINX, argv, f"http://{HOST}:{port}/health", folder / "nginx.log")
        plan.append((NGINX, server))
        targets[NGINX] = Target(NGINX, port, server)
    else:
        log("nginx is not installed: skipping it (scripts/ensure-bench-tools.sh installs it)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name, server in plan:
        server.start(s.cpu(LOAD_CPU if name == DIRECT else PROXY_CPU), env=env)
        servers.append(server)
    for _, server in plan:
        server.wait_ready()
    return targets


# -- throughput --------------------------------------------------------------------------------


@dataclass
class Runs:
    """wrk results per (target, mode, connections), one per round."""

    results: dict[tuple[str, str, int], list[WrkResult]] = field(default_factory=dict)
    cpu_us: dict[tuple[str, str, int], list[float]] = field(default_factory=dict)

    def add(self, key: tuple[str, str, int], r: WrkResult, cpu_us_per_req: float) -> None:
        self.results.setdefault(key, []).append(r)
        self.cpu_us.setdefault(key, []).append(cpu_us_per_req)

    def median(self, key: tuple[str, str, int], pick: Callable[[WrkResult], float]) -> float:
        return statistics.median(pick(r) for r in self.results[key])

    def cpu(self, key: tuple[str, str, int]) -> float:
        return statistics.median(self.cpu_us[key])


def place(t: Target, conns: int, s: Settings) -> None:
    """The latency layout (one connection): the proxy shares CPU 0 with wrk and the upstream,
    because on this VM a wake-up across CPUs costs more than the work of a request. The
    throughput layout (many connections): the proxy has CPU 1 to itself."""
    if t.name != DIRECT:
        t.server.pin(s.cpu(LOAD_CPU if conns == 1 else PROXY_CPU))


def throughput(targets: dict[str, Target], folder: Path, s: Settings) -> Runs:
    scripts = {"json": write_script(folder, False), "sse": write_script(folder, True)}
    names = list(targets)
    log("warming up every target")
    for t in targets.values():
        for script in scripts.values():
            run_wrk(t.url, script, 8, 1, s.cpu(LOAD_CPU))
    runs = Runs()
    total = s.rounds * len(scripts) * len(s.connections) * len(names)
    done = 0
    for rnd in range(s.rounds):
        order = names[rnd % len(names) :] + names[: rnd % len(names)]  # rotate who goes first
        for mode, script in scripts.items():
            for conns in s.connections:
                for name in order:
                    t = targets[name]
                    place(t, conns, s)
                    cpu0 = t.server.cpu_s()
                    r = run_wrk(t.url, script, conns, s.duration_s, s.cpu(LOAD_CPU))
                    cpu_s = t.server.cpu_s() - cpu0
                    runs.add((name, mode, conns), r, cpu_s / max(r.requests, 1) * 1e6)
                    done += 1
                    if r.errors or r.non2xx:
                        log(f"{name} {mode} c{conns}: {r.errors} errors, {r.non2xx} non-2xx")
            log(f"round {rnd + 1}/{s.rounds}: {mode} done ({done}/{total} runs)")
    return runs


# -- idle streams ------------------------------------------------------------------------------


async def _metric(port: int, name: str) -> float:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{HOST}:{port}/metrics") as resp,
    ):
        text = await resp.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _get(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return await resp.text()


@dataclass
class StreamCycle:
    how: str
    opened: int
    failed: int
    open_s: float
    peak_rss: int
    inflight: float
    upstream_held: int
    ended_cleanly: int
    after_rss: int
    inflight_after: float


@dataclass
class StreamsResult:
    streams: int
    nofile: int
    proxy_nofile: int
    baseline_rss: int
    cycles: list[StreamCycle]

    @property
    def per_stream_kib(self) -> float:
        c = self.cycles[0]
        return (c.peak_rss - self.baseline_rss) / max(c.opened, 1) / 1024


async def idle_streams(proxy: Target, upstream_port: int, s: Settings) -> StreamsResult:
    nofile = clients.raise_nofile(s.streams + 4096)
    proxy_nofile = nofile_limit(proxy.server.pids[0])
    # two descriptors per stream in the proxy, and some to spare: past its limit accept() fails
    count = min(s.streams, nofile - 1024, (proxy_nofile - 256) // 2)
    up = f"http://{HOST}:{upstream_port}"
    # warm the process so lazy imports and pools are not counted as streams
    await ledger_trips._load(proxy.port, 200, 16)
    await asyncio.sleep(1.0)
    baseline = proxy.server.rss_bytes()
    cycles = []
    for how in ("read to the end", "client disconnects", "read to the end"):
        t0 = time.monotonic()
        held, failed = await clients.open_streams(proxy.port, count)
        open_s = time.monotonic() - t0
        await asyncio.sleep(1.0)  # several meter samples with every stream in flight
        peak = proxy.server.rss_bytes()
        inflight = await _metric(proxy.port, "wattproxy_inflight_requests")
        upstream_held = int(await _get(f"{up}/bench/held"))
        if how == "read to the end":
            await _get(f"{up}/bench/release")
            ended = await clients.finish_streams(held)
        else:
            await clients.drop_streams(held)
            await asyncio.sleep(0.5)
            await _get(f"{up}/bench/release")
            ended = 0
        held.clear()
        await asyncio.sleep(3.0)  # the meter samples past their ends; the ledger flushes
        cycles.append(
            StreamCycle(
                how=how,
                opened=count - failed,
                failed=failed,
                open_s=open_s,
                peak_rss=peak,
                inflight=inflight,
                upstream_held=upstream_held,
                ended_cleanly=ended,
                after_rss=proxy.server.rss_bytes(),
                inflight_after=await _metric(proxy.port, "wattproxy_inflight_requests"),
            )
        )
        log(f"idle streams, {how}: {count - failed} opened in {open_s:.1f} s")
    return StreamsResult(count, nofile, proxy_nofile, baseline, cycles)


def start_stream_proxy(
    folder: Path, upstream_port: int, s: Settings, servers: list[Server]
) -> Target:
    port = free_port()
    cfg = wattproxy_config(folder, "streams", port, upstream_port, metered=True)
    server = Server(
        "wattproxy (streams)",
        [*wattproxy_argv(), "serve", "--config", str(cfg)],
        f"http://{HOST}:{port}/healthz",
        folder / "streams.log",
    )
    server.start(s.cpu(PROXY_CPU), env={**os.environ, "PYTHONPATH": str(ROOT)})
    servers.append(server)
    server.wait_ready()
    return Target("wattproxy (streams)", port, server)


# -- report ------------------------------------------------------------------------------------


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "absent"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0].split(" Copyright")[0] if text else "?"


def environment(s: Settings, load_before: str) -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1).strip() if m else "?"
    import aiohttp as _aiohttp

    try:
        import uvloop

        uv = uvloop.__version__
    except ImportError:
        uv = "absent"
    pin = (
        f"wrk, upstream and driver on CPU {LOAD_CPU}; the proxy under test on CPU {PROXY_CPU} "
        f"at 32 connections and for the idle streams, on CPU {LOAD_CPU} with the rest at one "
        "connection and for time to first byte (on this VM a wake-up across CPUs costs more "
        "than proxying a request; see docs/performance.md)"
        if s.pin
        else "not pinned"
    )
    return "\n".join(
        [
            f"- Run: {'quick (BENCH_QUICK=1)' if s.quick else 'full'}, {s.rounds} round(s) of "
            f"{s.duration_s:g} s per configuration, configurations alternating; medians over "
            "rounds. Pinning: " + pin + ".",
            f"- Machine: {os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}; load "
            f"average before the run {load_before}, after {_loadavg()} (shared machine: other "
            "work was running).",
            f"- Python {platform.python_version()}, aiohttp {_aiohttp.__version__}, uvloop {uv}, "
            f"{_version(['wrk', '--version'])}, {_version(['nginx', '-v'])}.",
        ]
    )


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _pct(x: float) -> str:
    return f"{x * 100:.0f} %"


def _verdict(ok: bool, detail: str) -> str:
    return ("met" if ok else "missed") + f" ({detail})"


def render(
    s: Settings,
    env_text: str,
    targets: dict[str, Target],
    runs: Runs,
    ttfb: dict[str, list[float]],
    streams: StreamsResult | None,
    trips: list[ledger_trips.LedgerTrips],
    sample_times: list[engine_scale.SampleTiming],
    accuracy: list[attribution_accuracy.Accuracy],
    abort_case: list[attribution_accuracy.AbortCase],
    sse_costs: list[sse_parser.ParserCost],
    workers_section: str | None = None,
) -> str:
    out: list[str] = [f"_Generated by `make bench` on {time.strftime('%Y-%m-%d %H:%M')}._", ""]
    out += [env_text, ""]
    out += ["### Throughput and latency", ""]
    out += [
        "| mode | conns | target | req/s | p50 ms | p99 ms | server CPU µs/req | "
        "req/s vs direct | req/s vs bare |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    modes = {"json": "non-streaming", "sse": "SSE, 20 chunks"}
    for mode, label in modes.items():
        for conns in s.connections:
            direct = runs.median((DIRECT, mode, conns), lambda r: r.rps)
            bare = runs.median((BARE, mode, conns), lambda r: r.rps)
            for name in targets:
                key = (name, mode, conns)
                rps = runs.median(key, lambda r: r.rps)
                out.append(
                    f"| {label} | {conns} | {name} | {rps:,.0f} | "
                    f"{runs.median(key, lambda r: r.p50_ms):.2f} | "
                    f"{runs.median(key, lambda r: r.p99_ms):.2f} | {runs.cpu(key):.0f} | "
                    f"{_pct(rps / direct)} | {_pct(rps / bare)} |"
                )
    out += [
        "",
        "Server CPU µs/req is the CPU time of the process under test (its workers for nginx; "
        "the upstream for direct) per request, read from /proc: unlike req/s it hardly moves "
        "when other work shares the machine.",
        "",
    ]
    # time to first streamed byte
    med = {name: statistics.median(v) * 1e3 for name, v in ttfb.items()}
    out += ["### Time to first streamed byte", ""]
    out += [
        f"{len(next(iter(ttfb.values())))} streaming requests per target over one keep-alive "
        "connection, interleaved; time from sending the request to the first byte of the first "
        "SSE event.",
        "",
        "| target | median ms | p90 ms | added vs direct (median) ms |",
        "|---|---:|---:|---:|",
    ]
    for name, values in ttfb.items():
        p90 = statistics.quantiles(values, n=10)[-1] * 1e3
        out.append(f"| {name} | {med[name]:.3f} | {p90:.3f} | {med[name] - med[DIRECT]:+.3f} |")
    out.append("")
    # targets
    nonstream_ratio = runs.median((WATTPROXY, "json", 32), lambda r: r.rps) / runs.median(
        (BARE, "json", 32), lambda r: r.rps
    )
    sse_ratio = runs.median((WATTPROXY, "sse", 32), lambda r: r.rps) / runs.median(
        (BARE, "sse", 32), lambda r: r.rps
    )
    cpu_json = runs.cpu((BARE, "json", 32)) / runs.cpu((WATTPROXY, "json", 32))
    cpu_sse = runs.cpu((BARE, "sse", 32)) / runs.cpu((WATTPROXY, "sse", 32))
    added_p50 = runs.median((WATTPROXY, "json", 1), lambda r: r.p50_ms) - runs.median(
        (DIRECT, "json", 1), lambda r: r.p50_ms
    )
    bare_added = runs.median((BARE, "json", 1), lambda r: r.p50_ms) - runs.median(
        (DIRECT, "json", 1), lambda r: r.p50_ms
    )
    added_ttfb = med[WATTPROXY] - med[DIRECT]
    on_off = [
        runs.median((WATTPROXY, m, 32), lambda r: r.rps)
        / runs.median((UNMETERED, m, 32), lambda r: r.rps)
        for m in modes
    ]
    cpu_on_off = [runs.cpu((WATTPROXY, m, 32)) / runs.cpu((UNMETERED, m, 32)) for m in modes]
    out += ["### Targets", ""]
    out += [
        "Throughput verdicts use server CPU per request (capacity of one core is its inverse), "
        "the figure that neighbours on this shared machine hardly move; req/s is shown beside "
        "it.",
        "",
        "| target | goal | measured | verdict |",
        "|---|---|---|---|",
    ]
    out.append(
        "| wattproxy / bare throughput, non-streaming, 32 conns | >= 80 % | "
        f"{_pct(cpu_json)} by CPU per request; {_pct(nonstream_ratio)} by req/s | "
        f"{_verdict(cpu_json >= 0.8, f'{(cpu_json - 0.8) * 100:+.0f} points vs goal')} |"
    )
    out.append(
        "| wattproxy / bare throughput, SSE, 32 conns | >= 80 % | "
        f"{_pct(cpu_sse)} by CPU per request; {_pct(sse_ratio)} by req/s | "
        f"{_verdict(cpu_sse >= 0.8, f'{(cpu_sse - 0.8) * 100:+.0f} points vs goal')} |"
    )
    out.append(
        "| added p50 over direct, non-streaming, 1 conn | <= 0.5 ms | "
        f"{added_p50:.2f} ms (bare aiohttp adds {bare_added:.2f} ms) | "
        f"{_verdict(added_p50 <= 0.5, f'{added_p50 - 0.5:+.2f} ms vs goal')} |"
    )
    out.append(
        f"| added time to first streamed byte (median) | <= 1 ms | {added_ttfb:.2f} ms "
        f"(bare aiohttp adds {med[BARE] - med[DIRECT]:.2f} ms) | "
        f"{_verdict(added_ttfb <= 1.0, f'{added_ttfb - 1.0:+.2f} ms vs goal')} |"
    )
    worst = max(abs(x - 1) for x in cpu_on_off)
    out.append(
        "| metering on vs off, 32 conns | within 10 % | CPU per request x"
        f"{cpu_on_off[0]:.2f} non-streaming, x{cpu_on_off[1]:.2f} SSE; req/s "
        f"{_pct(on_off[0])} and {_pct(on_off[1])} of metering off | "
        f"{_verdict(worst <= 0.10, f'worst {_pct(worst)} apart')} |"
    )
    for cost in sse_costs:
        out.append(
            f"| µs per SSE event, chunk path vs per-event path, {cost.per_chunk} event(s) per "
            f"chunk | <= 50 % | {cost.chunk_path_us:.2f} vs {cost.event_path_us:.2f} µs: "
            f"{_pct(cost.ratio)} | "
            f"{_verdict(cost.ratio <= 0.5, f'{(cost.ratio - 0.5) * 100:+.0f} points vs goal')} |"
        )
    out.append("")
    # memory
    out += ["### 10,000 idle streams", ""]
    if streams is None:
        out += ["Skipped.", ""]
    else:
        capped = (
            f" (asked for {s.streams:,}: the proxy's open-file limit here is "
            f"{streams.proxy_nofile:,} and each stream holds two descriptors in it)"
            if streams.streams < s.streams
            else ""
        )
        out += [
            f"{streams.streams:,} streaming requests{capped} held open at once through a fresh "
            "metered wattproxy (the upstream sends headers and one chunk, then waits), three "
            "times. The load client raises its open-file limit with `resource.setrlimit` (here "
            f"to {streams.nofile:,}) and the servers are started with the highest limit allowed "
            "(`bench/procs.py`). In production give wattproxy `ulimit -n 65536` "
            "(`LimitNOFILE=65536`): two descriptors per stream.",
            "",
            "| cycle | opened | open time s | in flight (gauge) | held upstream | RSS peak MiB "
            "| RSS after MiB | in flight after |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for c in streams.cycles:
            out.append(
                f"| {c.how} | {c.opened:,} | {c.open_s:.1f} | {c.inflight:,.0f} | "
                f"{c.upstream_held:,} | {c.peak_rss / 2**20:.0f} | {c.after_rss / 2**20:.0f} | "
                f"{c.inflight_after:.0f} |"
            )
        growth = streams.cycles[-1].after_rss - streams.cycles[1].after_rss
        out += [
            "",
            f"RSS before: {streams.baseline_rss / 2**20:.0f} MiB; per held stream: "
            f"**{streams.per_stream_kib:.1f} KiB**; after the third cycle "
            f"{growth / 2**20:+.1f} MiB against the second. CPython keeps freed memory in its "
            "arenas, so the first cycle's high-water mark stays; a leak would add to it on every "
            "cycle.",
            "",
        ]
    # ledger
    out += ["### Ledger round trips per request", ""]
    out += [
        "| backend | requests | records written | round trips | per request | "
        "commands per request |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for t in trips:
        cmds = "-" if t.commands_per_request is None else f"{t.commands_per_request:.1f}"
        unit = "transactions" if t.backend == "sqlite" else "round trips"
        out.append(
            f"| {t.backend} | {t.requests:,} | {t.records_written:,} | {t.trips} {unit} | "
            f"{t.trips_per_request:.4f} | {cmds} |"
        )
    if not any(t.backend == "redis" for t in trips):
        out.append("| redis | - | - | - | - | skipped: redis-server or the Redis ledger absent |")
    out += [
        "",
        "Default batching (256 records or 500 ms). Redis round trips are counted by a relay "
        "between proxy and a private redis-server (each turn of the proxy after Redis answered); "
        "commands come from `INFO stats` and include those the ledger's Lua script runs inside "
        "Redis.",
        "",
    ]
    # engine
    out += ["### Attribution engine, 10,000 requests in flight", ""]
    out += ["| weighting | one 100 ms sample, median ms | min ms | goal |", "|---|---:|---:|---|"]
    for st in sample_times:
        out.append(
            f"| {st.weighting} | {st.median_ms:.2f} | {st.min_ms:.2f} | < 10 ms: "
            f"{'met' if st.median_ms < 10 else 'missed'} |"
        )
    out += [
        "",
        "Also `pytest tests/test_bench_attribution.py` (pytest-benchmark; times are reported, "
        "never asserted).",
        "",
    ]
    out += ["### Work vs time weighting accuracy", ""]
    out += [attribution_accuracy.markdown(accuracy, 7, 240), ""]
    out += [attribution_accuracy.markdown_abort(abort_case), ""]
    out += ["### µs per SSE event", ""]
    out += [sse_parser.markdown(sse_costs), ""]
    if workers_section is not None:
        out += [workers_section]
    return "\n".join(out)


def write_results(path: Path, block: str) -> None:
    text = path.read_text("utf-8") if path.exists() else ""
    section = f"{START_MARK}\n{block}\n{END_MARK}"
    if START_MARK in text and END_MARK in text:
        head, rest = text.split(START_MARK, 1)
        tail = rest.split(END_MARK, 1)[1]
        text = head + section + tail
    else:
        text = (text or "# Benchmarks\n") + "\n## Results\n\n" + section + "\n"
    path.write_text(text, "utf-8")


def main() -> int:
    s = Settings.from_env(dict(os.environ))
    if shutil.which("wrk") is None:
        print("bench: wrk is not installed (run scripts/ensure-bench-tools.sh)", file=sys.stderr)
        return 1
    if s.pin:
        os.sched_setaffinity(0, {int(LOAD_CPU)})
    load_before = _loadavg()
    folder = Path(tempfile.mkdtemp(prefix="wattproxy-bench-"))
    servers: list[Server] = []
    t_start = time.monotonic()
    try:
        log(f"starting servers in {folder}")
        targets = start_servers(folder, s, servers)
        runs = throughput(targets, folder, s)
        log("time to first streamed byte")
        for t in targets.values():
            place(t, 1, s)
        ttfb = clients.time_to_first_event(
            {name: t.port for name, t in targets.items()}, s.ttfb_requests, rounds=5
        )
        up_port = targets[DIRECT].port
        for name in (WATTPROXY, UNMETERED, BARE, NGINX):
            if name in targets:  # free the CPU for what follows
                targets[name].server.stop()
        streams = None
        if s.streams > 0:
            log(f"{s.streams:,} idle streams")
            proxy = start_stream_proxy(folder, up_port, s, servers)
            streams = asyncio.run(idle_streams(proxy, up_port, s))
            proxy.server.stop()
        log("ledger round trips")
        up_url = f"http://{HOST}:{up_port}"
        trips = [asyncio.run(ledger_trips.sqlite_trips(up_url, folder, s.ledger_requests))]
        if ledger_trips.redis_available():
            trips.append(asyncio.run(ledger_trips.redis_trips(up_url, folder, s.ledger_requests)))
        log("attribution engine at 10,000 in flight; weighting accuracy")
        sample_times = [engine_scale.time_sample(w) for w in (Weighting.WORK, Weighting.TIME)]
        accuracy = attribution_accuracy.compare()
        abort_case = attribution_accuracy.compare_abort()
        log("SSE parsing, µs per event")
        sse_costs = sse_parser.measure(rounds=5 if s.quick else sse_parser.ROUNDS)
        workers_section = None
        if s.workers:
            from bench import workers  # it imports this module

            log("workers: N = 1 and N = 2")
            upstream = (up_port, targets[DIRECT].server)
            workers_section = workers.render(workers.measure(s, folder, servers, upstream))
        block = render(
            s,
            environment(s, load_before),
            targets,
            runs,
            ttfb,
            streams,
            trips,
            sample_times,
            accuracy,
            abort_case,
            sse_costs,
            workers_section,
        )
    finally:
        stop_all(servers)
        for db in Path("/dev/shm").glob(f"{folder.name}-*"):
            db.unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
    print(block)
    write_results(s.out, block)
    log(f"wrote {s.out} ({time.monotonic() - t_start:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
