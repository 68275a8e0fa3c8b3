"""What a config reload replaces, as one frozen value (``Runtime``), and the box that holds the
one in force (``Live``). A reload prepares a whole new runtime and swaps it in with one
assignment; a request reads the runtime once, as it starts, so it sees the old config or the
new one, never a mix (its upstream session is taken from the runtime in force when it is sent).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from estimators.estimator import RequestShape
from estimators.model_card import task_from_model_path
from proxy.config import BudgetsConfig, Config
from proxy.identity import Identity, IdentityResolver, KeyStore
from proxy.routing import Router
from proxy.sessions import UpstreamSession
from proxy.tokens import TokenCounter

log = logging.getLogger("wattproxy")


class BudgetGate(Protocol):
    """The budgets as a runtime uses them: ``proxy.budgets.Budgets``, or a worker's
    ``RemoteBudgets`` (asked of the accounting process)."""

    @property
    def enabled(self) -> bool: ...

    async def check(
        self,
        identity: Identity,
        request_id: str | None = None,
        shape: RequestShape | None = None,
    ) -> None: ...

    def reconfigure(self, cfg: BudgetsConfig) -> None: ...


#: Budget check: raises ``BudgetExceeded`` for an identity over its budget, else reserves the
#: request's expected grams (by request id, from its shape) until its record is final.
BudgetCheck = Callable[[Identity, str, RequestShape], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Runtime:
    """The parts of the proxy a config reload replaces."""

    cfg: Config
    router: Router
    identity: IdentityResolver
    #: upstream name -> its session (opened at startup, so empty before)
    sessions: Mapping[str, UpstreamSession]
    #: upstream name -> its loaded tokenizer (upstreams with a usable ``model_path`` only)
    counters: Mapping[str, TokenCounter]
    #: upstream name -> the task read from its model_path's config (for routes that fix none)
    model_tasks: Mapping[str, str]
    #: upstream name -> the API key the proxy sends it (from ``api_key_env``)
    upstream_keys: Mapping[str, str]
    #: None when no budget is configured: no work on the request path
    budget_check: BudgetCheck | None


class Live:
    """The runtime in force: read once per request, replaced whole by a reload."""

    __slots__ = ("runtime",)

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime


def load_keys(cfg: Config) -> KeyStore | None:
    """The keys file's keys (``ConfigError`` when it cannot be used), or None without one."""
    return KeyStore.load(cfg.identity.keys_file) if cfg.identity.keys_file else None


def build_runtime(
    cfg: Config,
    keys: KeyStore | None,
    environ: Mapping[str, str],
    budgets: BudgetGate | None,
    sessions: Mapping[str, UpstreamSession],
    counters: Mapping[str, TokenCounter],
    model_tasks: Mapping[str, str],
) -> Runtime:
    """A runtime for ``cfg`` from its prepared parts (``budgets`` already reconfigured)."""
    return Runtime(
        cfg=cfg,
        router=Router(cfg.upstreams),
        identity=IdentityResolver(keys, cfg.identity.allow_header_identity),
        sessions=sessions,
        counters=counters,
        model_tasks=model_tasks,
        upstream_keys={
            u.name: environ.get(u.api_key_env, "") for u in cfg.upstreams if u.api_key_env
        },
        budget_check=budgets.check if budgets is not None and budgets.enabled else None,
    )


def model_tasks_of(cfg: Config) -> dict[str, str]:
    """Upstream -> the task its ``model_path``'s config names (reads files: off the loop)."""
    tasks = {}
    for upstream in cfg.upstreams:
        task = task_from_model_path(upstream.model_path) if upstream.model_path else None
        if task is not None:
            tasks[upstream.name] = task
    return tasks


async def load_counters(counters: Mapping[str, TokenCounter]) -> dict[str, TokenCounter]:
    """Load the tokenizers (off the loop); an upstream whose folder has none usable counts
    tokens from the server or by estimate instead, with a warning."""
    results = await asyncio.gather(
        *(asyncio.to_thread(c.load) for c in counters.values()), return_exceptions=True
    )
    loaded = {}
    for (name, counter), result in zip(counters.items(), results, strict=True):
        if isinstance(result, Exception):
            log.warning(
                "upstreams.%s.model_path: no tokenizer in %s (%s); tokens come from the server "
                "or are estimated",
                name,
                counter.model_path,
                type(result).__name__,
            )
        else:
            loaded[name] = counter
    return loaded
