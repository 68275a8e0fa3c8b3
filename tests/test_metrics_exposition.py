"""One exact-text check of the exported metrics for a known sequence of requests and samples."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from estimators.attribution import AttributionEngine, IdlePolicy, Weighting
from estimators.estimator import Estimator
from estimators.meters import Reading
from proxy.accounting import Accountant
from proxy.metrics import Metrics
from proxy.records import RequestRecord
from proxy.usage.base import Usage


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def lines(text: str, *prefixes: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith(prefixes)]


def test_known_sequence_exposition() -> None:
    clock = Clock()
    metrics = Metrics(CollectorRegistry())
    finals: list[RequestRecord] = []

    def sink(record: RequestRecord) -> None:  # as the app's: the final metrics, then on
        metrics.observe_final(record)
        finals.append(record)

    acc = Accountant(
        AttributionEngine(Weighting.TIME, IdlePolicy.EXCLUDE, idle_power_w=50.0),
        Estimator(),
        sink,
        observer=metrics,
        meter_devices=["gpu0"],
        meter_kind="nvml",
        g_per_j=lambda: 0.0001,
        clock=clock,
    )
    acc.on_reading(Reading(0.0, {"gpu0": 1000.0}, {"gpu0": 50.0}))
    rec = RequestRecord("r1", "alice", "research", "llm", "llama", "text-generation", 0, "t")
    req = acc.begin(rec, ["gpu0"], 10, stream=False)
    clock.t = 1.0
    acc.end(req, 200, Usage(10, 5, "server"))
    acc.on_reading(Reading(2.0, {"gpu0": 1300.0}, {"gpu0": 150.0}))
    assert [r.request_id for r in finals] == ["r1"]
    text = metrics.exposition().decode()
    assert lines(
        text,
        "wattproxy_device_energy_joules_total",
        "wattproxy_attributed_energy_joules_total",
        "wattproxy_unattributed_energy_joules_total",
        "wattproxy_energy_joules_total",
        "wattproxy_co2e_grams_total",
        "wattproxy_requests_total",
        "wattproxy_tokens_total",
        "wattproxy_meter_up",
        "wattproxy_device_power_watts",
        "wattproxy_inflight_requests",
    ) == [
        'wattproxy_requests_total{code="200",model="llama",task="text-generation",upstream="llm"} 1.0',
        'wattproxy_tokens_total{model="llama",task="text-generation",type="prompt",upstream="llm"} 10.0',
        'wattproxy_tokens_total{model="llama",task="text-generation",type="completion",upstream="llm"} 5.0',
        'wattproxy_energy_joules_total{model="llama",source="measured",task="text-generation",upstream="llm"} 200.0',
        'wattproxy_co2e_grams_total{model="llama",source="measured",task="text-generation",upstream="llm"} 0.02',
        'wattproxy_device_energy_joules_total{device="gpu0"} 300.0',
        'wattproxy_attributed_energy_joules_total{device="gpu0"} 200.0',
        'wattproxy_unattributed_energy_joules_total{device="gpu0",reason="idle"} 100.0',
        'wattproxy_device_power_watts{device="gpu0"} 150.0',
        'wattproxy_inflight_requests{upstream="llm"} 0.0',
        'wattproxy_meter_up{device="gpu0",kind="nvml"} 1.0',
    ]


def test_model_label_is_capped() -> None:
    metrics = Metrics(CollectorRegistry(), max_model_labels=3)
    got = {metrics.model_label(f"m{i}") for i in range(100)}
    assert got == {"m0", "m1", "m2", "_other"}


def test_user_labels_capped_for_10000_users() -> None:
    metrics = Metrics(CollectorRegistry(), per_user_labels=True, max_user_labels=50)
    for i in range(10_000):
        labels = metrics.energy_labels("llm", "m", "text-generation", "measured", f"user{i}")
        metrics.energy.labels(*labels).inc(1.0)
    samples = [
        s
        for m in metrics.registry.collect()
        if m.name == "wattproxy_energy_joules"
        for s in m.samples
        if s.name.endswith("_total")
    ]
    assert len(samples) == 51
    other = [s for s in samples if s.labels["user"] == "_other"]
    assert other[0].value == 10_000 - 50


def test_every_spec_family_is_exposed_with_help() -> None:
    from proxy.metrics import SPEC_FAMILIES

    metrics = Metrics(CollectorRegistry())
    metrics.budget_rejections.labels("user").inc()
    metrics.ledger_errors.labels("sqlite").inc()
    text = metrics.exposition().decode()
    for name in SPEC_FAMILIES:
        base = name.removesuffix("_total")
        assert f"# HELP {base}" in text or f"# HELP {name}" in text, name
        assert f"# TYPE {base}" in text or f"# TYPE {name}" in text, name
