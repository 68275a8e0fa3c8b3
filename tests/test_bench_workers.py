"""The workers benchmark's arithmetic and report (``bench.workers``): the projection for N
workers, the medians, the target verdicts and where the section goes in BENCHMARKS.md. The
measurement itself runs in ``make bench``, not here."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.run import END_MARK, START_MARK, Settings
from bench.workers import (
    DIRECT,
    HEADING,
    N1,
    N2,
    N2_OFF,
    Profile,
    Row,
    Sample,
    WorkersResult,
    insert_section,
    project,
    render,
    summarize,
)


def test_projection_is_bound_by_the_workers_then_by_the_accounting_process() -> None:
    # a worker: 400 µs per request (2,500 req/s a core); the accounting process: 100 µs
    two = project(2, worker_us=400.0, accounting_us=100.0)
    assert two.worker_rps == pytest.approx(5_000)
    assert two.accounting_rps == pytest.approx(10_000)
    assert two.own_cores_rps == pytest.approx(5_000)
    assert two.shared_cores_rps == pytest.approx(4_000)  # 2 cores / 500 µs
    assert two.limited_by == "workers"
    eight = project(8, worker_us=400.0, accounting_us=100.0)
    assert eight.own_cores_rps == pytest.approx(10_000)  # 20,000 for the workers
    assert eight.shared_cores_rps == pytest.approx(10_000)  # 16,000 by cores
    assert eight.limited_by == "accounting process"


def sample(rps: float, accounting_us: float, workers_us: float) -> Sample:
    return Sample(
        rps=rps,
        p50_ms=10.0,
        p99_ms=20.0,
        requests=int(rps * 5),
        failed=0,
        accounting_us=accounting_us,
        workers_us=workers_us,
        worker_shares=(0.5, 0.5) if workers_us else (),
        upstream_us=150.0,
        wrk_us=40.0,
        idle=0.0,
        steal=0.0,
    )


def test_summary_takes_medians_and_the_accounting_share_of_a_worker() -> None:
    row = summarize([sample(1000, 100, 400), sample(1200, 140, 500), sample(900, 120, 430)])
    assert row.rps == 1000
    assert row.accounting_us == 120
    assert row.workers_us == 430  # the median, not the mean (443)
    assert row.accounting_share == pytest.approx(120 / 430)
    assert row.proxy_us == 550


def result(n2_sse_rps: float, n2_sse_accounting_us: float) -> WorkersResult:
    def row(rps: float, acc: float, workers: float) -> Row:
        return summarize([sample(rps, acc, workers)])

    rows = {
        (N1, "json"): row(2000, 450, 0),
        (N1, "sse"): row(1500, 600, 0),
        (N2, "json"): row(3500, 100, 400),
        (N2, "sse"): row(n2_sse_rps, n2_sse_accounting_us, 520),
        (N2_OFF, "json"): row(3600, 90, 390),
        (N2_OFF, "sse"): row(2700, 110, 500),
    }
    profiles = [
        Profile("json", 1000, 3000, 100, 0, [], []),
        Profile("sse", 1000, 4000, 150, 1000, [], []),
    ]
    return WorkersResult(
        settings=Settings.from_env({"BENCH_QUICK": "1"}),
        rows=rows,
        ttfb_ms={DIRECT: [0.2] * 20, N1: [1.0] * 20, N2: [1.05] * 20},
        profiles=profiles,
        perf=None,
        load_before="0 0 0",
        load_after="0 0 0",
    )


def verdict(text: str, target: str) -> str:
    line = next(x for x in text.splitlines() if x.startswith(f"| {target}"))
    return line.rsplit("|", 2)[1].strip()


def test_verdicts_follow_the_goals() -> None:
    good = render(result(n2_sse_rps=2700, n2_sse_accounting_us=120))
    assert verdict(good, "SSE throughput, N = 2 / N = 1").startswith("met")  # 1.8x
    assert verdict(good, "accounting process CPU per request / a worker's, SSE").startswith(
        "met"
    )  # 120 / 520 = 23 %
    assert verdict(good, "accounting process CPU per request / a worker's, non-s").startswith(
        "met"
    )  # 25 %
    assert verdict(good, "metering on vs off").startswith("met")
    assert verdict(good, "added time to first streamed byte, N = 2 |").startswith("met")
    bad = render(result(n2_sse_rps=2400, n2_sse_accounting_us=140))
    assert verdict(bad, "SSE throughput, N = 2 / N = 1").startswith("missed")  # 1.6x
    # two cores over 520 + 140 + 150 (upstream) + 40 (wrk) µs: 2,353 req/s, x1.57 of N = 1's
    assert "the machine's ceiling x1.57" in bad
    assert verdict(bad, "accounting process CPU per request / a worker's, SSE").startswith(
        "missed"
    )  # 27 %
    # events/s where the accounting process saturates: 4 events per SSE request
    line = next(x for x in bad.splitlines() if x.startswith("| SSE, 20 chunks | 8 |"))
    assert "| 7,143 | 28,571 |" in line


def test_section_replaces_an_earlier_one_in_the_results_block(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(f"# B\n\n{START_MARK}\n### Throughput\n\nrows\n{END_MARK}\n\nafter\n")
    insert_section(path, f"{HEADING}\n\nfirst\n")
    insert_section(path, f"{HEADING}\n\nsecond\n")
    text = path.read_text()
    assert text.count(HEADING) == 1
    assert "second" in text and "first" not in text
    assert text.index("### Throughput") < text.index(HEADING) < text.index(END_MARK)
    assert text.endswith(f"{END_MARK}\n\nafter\n")
