"""Energy in the answer (opt-in): the request's energy figures in the ``usage`` object the
client asked for, and the expected energy in a header of a non-streamed answer.

Asked for by ``response.energy_in_usage: true`` or, per request, by the header
``X-Wattproxy-Energy: include`` (never sent upstream). The figures are provisional, since the
request has not ended when its usage passes through: ``final`` is false, and they are the
energy attributed to the request so far (``measured``: every interval of its life read) or
else the estimator's expected energy for it (``estimated``). The final figures are in its
record (``/v1/emissions``, the ledger). ``X-Wattproxy-Energy-Estimate-J`` is the expected
energy before the answer, as the name says, sent with the answer's head (no trailer).

The proxy calls three things, at marked hook lines: ``figures_for`` once the request is open,
``start`` when the response head goes out, and the returned ``UsageSplicer``'s ``feed`` for
each chunk of a non-streamed JSON body. A stream's final usage is spliced by its parser, given
``plan.energy`` (``OpenAISSE``; ``EventSSE``, ``OllamaStream``, ``TGIStream`` through
``ObservingStream``); ``start`` takes it back from the parser of an error answer. The splicing
itself is ``proxy.usage.energy_splice``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from multidict import CIMultiDict

from proxy.tasks import OTHER
from proxy.usage.base import BodyUsage, RequestPlan, StreamUsage
from proxy.usage.energy_splice import Figures, UsageSplicer, number

if TYPE_CHECKING:
    from proxy.accounting import Accounts, OpenRequest

#: The request header that asks for energy in the answer (value ``include``).
REQUEST_HEADER = "X-Wattproxy-Energy"
#: The response header of a non-streamed answer: expected energy, joules.
ESTIMATE_HEADER = "X-Wattproxy-Energy-Estimate-J"


def wanted(enabled: bool, headers: Mapping[str, str]) -> bool:
    """Whether a request gets energy in its answer: the config's ``response.energy_in_usage``,
    or its own ``X-Wattproxy-Energy: include``."""
    return enabled or headers.get(REQUEST_HEADER, "").strip().lower() == "include"


class RequestFigures:
    """A request's figures as they stand (called when its usage passes through)."""

    __slots__ = ("accountant", "estimate_j", "req")

    def __init__(self, accountant: Accounts, req: OpenRequest) -> None:
        self.accountant = accountant
        self.req = req
        accountant.want_figures(req)
        #: what the estimator expects of the request before its answer
        self.estimate_j = accountant.estimator.estimate(req.shape).energy_j

    def __call__(self) -> Figures:
        rec = self.accountant.provisional(self.req.record.request_id)
        if rec is not None and rec.source == "measured":
            return rec.energy_j, rec.co2e_g, "measured"
        estimate_j = self.accountant.estimator.estimate(self.req.shape).energy_j
        g_per_j = self.accountant.upstream_g_per_j(self.req.record.upstream)
        return estimate_j, estimate_j * g_per_j, "estimated"


def figures_for(
    enabled: bool, headers: Mapping[str, str], accountant: Accounts, req: OpenRequest
) -> RequestFigures | None:
    """The figures callable for ``plan.energy``; None when energy was not asked for, or the
    request is no inference (``OTHER``: charged nothing)."""
    if not wanted(enabled, headers) or req.record.task == OTHER:
        return None
    return RequestFigures(accountant, req)


def start(
    status: int,
    plan: RequestPlan,
    parser: StreamUsage | None,
    collector: BodyUsage | None,
    headers: CIMultiDict[str],
) -> tuple[UsageSplicer | None, bool]:
    """At the response head: ``(splicer for a non-streamed JSON body, whether the upstream's
    Content-Length may be kept)``; adds ``X-Wattproxy-Energy-Estimate-J`` to ``headers`` for a
    non-streamed answer. A body that may be rewritten goes out chunked. An error answer
    (``status`` 4xx, 5xx) is left as it is."""
    figures = plan.energy
    if parser is not None and status >= 400:
        parser.energy = None  # an error answer is relayed as it came, even a stream
    if figures is None or status >= 400:
        return None, True
    if parser is None and not plan.stream and isinstance(figures, RequestFigures):
        headers[ESTIMATE_HEADER] = number(figures.estimate_j).decode()
    if parser is None and collector is not None:  # a JSON body: its usage object
        return UsageSplicer(figures, path=plan.usage_at), False
    return None, parser is None or parser.energy is None
