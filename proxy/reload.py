"""A config reload (SIGHUP): upstreams and routing, identity keys, budgets, limits and the access
log change live; the sections that hold open resources (listeners, meter, ledger...) keep their
old values until a restart, and are named.

Everything is prepared first (sessions, tokenizers, the keys file, model tasks), then the new
``Runtime`` is swapped in with one assignment, with no await in between: a request sees the old
config or the new one, never a mix, and requests in flight finish on the upstream they were
routed to. Sessions the new runtime no longer uses are retired: closed once the requests
streaming through them are done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Protocol

from proxy.background import Background
from proxy.config import Config, load_config
from proxy.errors import ConfigError
from proxy.route_policy import RouteState
from proxy.runtime import (
    BudgetGate,
    Live,
    Runtime,
    build_runtime,
    load_counters,
    load_keys,
    model_tasks_of,
)
from proxy.sessions import Sessions, UpstreamSession
from proxy.tokens import TokenCounter

log = logging.getLogger("wattproxy")

#: Config sections a SIGHUP reload does not apply (listeners, meter, ledger...): restart.
RESTART_ONLY = (
    "listen",
    "meter",
    "attribution",
    "carbon",
    "ledger",
    "metrics",
    "admin_token_env",
    "tracing",
)


class Reloadable(Protocol):
    """What a reload replaces and reconfigures: ``proxy.app.Parts`` of a proxy process, a
    worker's ``proxy.workers.worker.WorkerParts``."""

    live: Live
    sessions: Sessions
    environ: Mapping[str, str]
    background: Background

    @property
    def runtime(self) -> Runtime: ...

    @property
    def budgets(self) -> BudgetGate | None: ...

    @property
    def routes(self) -> RouteState | None: ...


async def reload_file(path: str | None, parts: Reloadable) -> Config | None:
    """Read the config file again and apply it; the new config, or None (the running one
    kept, and the reason logged) when it is invalid or there is no file."""
    if path is None:
        log.warning("reload: started without a config file; nothing to reload")
        return None
    try:
        new = await asyncio.to_thread(load_config, path)
        restart = await apply_config(parts, new)
    except ConfigError as err:
        log.error(
            "reload of %s failed; the running config stays:\n  %s", path, "\n  ".join(err.problems)
        )
        return None
    names = ", ".join(u.name for u in new.upstreams)
    log.info("reloaded %s: upstreams %s", path, names)
    if restart:
        log.warning("reload: changes to %s apply after a restart", ", ".join(restart))
    return new


async def apply_config(parts: Reloadable, new: Config) -> list[str]:
    """Apply a reloaded config to the running proxy.

    Returns the changed sections that a reload does not apply (they keep their old values).
    Raises ``ConfigError`` (and changes nothing) when the new keys file cannot be used.
    """
    rt = parts.runtime
    old = rt.cfg
    held = {name: getattr(old, name) for name in RESTART_ONLY}
    needs_restart = [name for name in RESTART_ONLY if getattr(new, name) != held[name]]
    cfg = new.model_copy(update=held)
    keys = load_keys(cfg)  # the one step that may refuse the config: before anything opens
    before = {u.name: u for u in old.upstreams}
    sessions: dict[str, UpstreamSession] = {}
    for upstream in cfg.upstreams:
        prior = rt.sessions.get(upstream.name)
        same = before.get(upstream.name) == upstream
        sessions[upstream.name] = (
            prior if prior is not None and same else parts.sessions.open(upstream)
        )
    counters: dict[str, TokenCounter] = {}
    for upstream in cfg.upstreams:
        if not upstream.model_path:
            continue
        counter = rt.counters.get(upstream.name)
        if counter is None or before[upstream.name].model_path != upstream.model_path:
            counter = TokenCounter(upstream.model_path)
        counters[upstream.name] = counter
    loaded = await load_counters(counters)
    model_tasks = await asyncio.to_thread(model_tasks_of, cfg)
    # -- the swap: no await from here on --------------------------------------------------
    budgets = parts.budgets
    if budgets is not None:  # one for the process's life: holds of requests in flight stay
        budgets.reconfigure(cfg.budgets)
    parts.live.runtime = build_runtime(
        cfg, keys, parts.environ, budgets, sessions, loaded, model_tasks
    )
    parts.sessions.retire(s for s in rt.sessions.values() if s not in sessions.values())
    if parts.routes is not None:  # a zone an upstream names anew gets its clock running
        for clock in parts.routes.ensure_clocks(cfg.upstreams):
            parts.background.spawn(f"carbon-intensity-{clock.zone}", clock.run())
    return needs_restart
