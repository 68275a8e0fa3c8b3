"""wrk runs: a Lua script per request shape (POST body, JSON summary line), and a parser."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.procs import pin_prefix

PROMPT = (
    "Summarise the energy use of a data centre in three sentences, with numbers and sources. "
    "Mention cooling, power usage effectiveness and the share of the grid it draws."
)
PATH = "/v1/chat/completions"

_SCRIPT = """
wrk.method = "POST"
wrk.body = [=[{body}]=]
wrk.headers["Content-Type"] = "application/json"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {{\\"requests\\":%d,\\"duration_us\\":%d,\\"p50_us\\":%d,\\"p99_us\\":%d," ..
    "\\"mean_us\\":%f,\\"errors\\":%d,\\"non2xx\\":%d}}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.mean, e.connect + e.read + e.write + e.timeout, e.status))
end
"""


def request_body(stream: bool, model: str = "bench") -> bytes:
    """The chat request every run sends (streaming ones without ``include_usage``, so
    wattproxy adds it and strips the usage chunk again: its heavier path)."""
    doc: dict[str, object] = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 20,
    }
    if stream:
        doc["stream"] = True
    return json.dumps(doc, separators=(",", ":")).encode()


def write_script(folder: Path, stream: bool) -> Path:
    path = folder / ("sse.lua" if stream else "json.lua")
    path.write_text(_SCRIPT.format(body=request_body(stream).decode()))
    return path


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    errors: int
    non2xx: int

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0


def run_wrk(
    url: str,
    script: Path,
    connections: int,
    duration_s: float,
    cpus: str | None,
    timeout_s: float = 5.0,
) -> WrkResult:
    """One wrk run (one thread) against ``url``; raises when wrk prints no summary."""
    argv = [
        *pin_prefix(cpus),
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration_s:g}s",
        f"--timeout={timeout_s:g}s",
        "-s",
        str(script),
        url,
    ]
    out = subprocess.run(
        argv, capture_output=True, text=True, timeout=duration_s + timeout_s + 30, check=False
    )
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            d = json.loads(line[len("WRKJSON ") :])
            return WrkResult(
                requests=int(d["requests"]),
                duration_s=d["duration_us"] / 1e6,
                p50_ms=d["p50_us"] / 1e3,
                p99_ms=d["p99_us"] / 1e3,
                mean_ms=d["mean_us"] / 1e3,
                errors=int(d["errors"]),
                non2xx=int(d["non2xx"]),
            )
    raise RuntimeError(f"wrk printed no summary: {out.stdout[-500:]} {out.stderr[-500:]}")
