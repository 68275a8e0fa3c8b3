"""``wattproxy serve | demo | report | check-config | estimate``.

Every failure a user can cause ends in a clear message and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from proxy import __version__
from proxy.config import (
    ENV_PREFIX,
    Config,
    config_warnings,
    file_problems,
    load_config,
    parse_workers,
)
from proxy.errors import ConfigError, LedgerError, WorkerError

EXIT_CONFIG = 2
DEFAULT_CONFIG = "config.yaml"

log = logging.getLogger("wattproxy")


def _config_path(path: str | None) -> str | None:
    """``--config``; without it, ./config.yaml if present, else None (defaults and env)."""
    if path is None and Path(DEFAULT_CONFIG).is_file():
        return DEFAULT_CONFIG
    return path


def _config(path: str | None) -> Config:
    return load_config(_config_path(path))


def _print_problems(err: ConfigError) -> None:
    print(f"wattproxy: invalid configuration ({len(err.problems)} problem(s)):", file=sys.stderr)
    for problem in err.problems:
        print(f"  - {problem}", file=sys.stderr)


def _check_files(cfg: Config, origin: str) -> None:
    """What the config names on this machine: the ledger's and spool's folders, the keys file.
    Raises ``ConfigError`` listing every problem."""
    problems = [f"{origin}: {p}" for p in file_problems(cfg)]
    if cfg.identity.keys_file:
        from proxy.identity import KeyStore

        try:
            KeyStore.load(cfg.identity.keys_file)
        except ConfigError as err:
            problems += err.problems
    if problems:
        raise ConfigError(problems)


def cmd_check_config(args: argparse.Namespace) -> int:
    problems: list[str] = []
    cfg: Config | None
    try:
        cfg = load_config(args.path)
    except ConfigError as err:  # a well-formed config with problems still has files to check
        cfg, problems = err.config, err.problems
    if cfg is not None:
        try:
            _check_files(cfg, args.path)
        except ConfigError as err:
            problems = problems + err.problems
        for warning in config_warnings(cfg):
            print(f"wattproxy: warning: {warning}", file=sys.stderr)
    if problems or cfg is None:
        _print_problems(ConfigError(problems))
        return EXIT_CONFIG
    names = ", ".join(
        f"{u.name} ({u.url}{'' if u.prefix == '/' else u.prefix})" for u in cfg.upstreams
    )
    print(
        f"{args.path}: ok; upstreams: {names}; meter: {cfg.meter.kind}; ledger: "
        f"{cfg.ledger.url.split('://')[0]}"
    )
    return 0


def _workers_arg(value: str) -> str:
    try:
        return str(parse_workers(value))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_serve(args: argparse.Namespace) -> int:
    if args.workers is not None:  # as its env override, so it is validated with the rest
        os.environ[f"{ENV_PREFIX}LISTEN__WORKERS"] = args.workers
    try:
        cfg = _config(args.config)
        _check_files(cfg, _config_path(args.config) or "defaults")
    except ConfigError as err:
        _print_problems(err)
        return EXIT_CONFIG
    for warning in config_warnings(cfg):
        log.warning("%s", warning)
    from estimators.errors import MeterError
    from proxy.server import serve

    try:
        return serve(cfg, config_path=_config_path(args.config))
    except ConfigError as err:
        _print_problems(err)
        return EXIT_CONFIG
    except MeterError as e:
        print(f"wattproxy: meter.kind {cfg.meter.kind!r} cannot start: {e}", file=sys.stderr)
        return 1
    except LedgerError as e:
        print(f"wattproxy: the ledger cannot start: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(
            f"wattproxy: cannot listen on {cfg.listen.host}:{cfg.listen.port}: {e.strerror or e}",
            file=sys.stderr,
        )
        return 1
    except WorkerError as e:
        print(f"wattproxy: listen.workers: {e}", file=sys.stderr)
        return 1


def cmd_demo(args: argparse.Namespace) -> int:
    if args.scenario == "carbon-routing":
        from proxy.demo_routing import run_routing_demo

        return asyncio.run(run_routing_demo(Path(args.out), requests=args.requests))
    from proxy.demo import run_demo

    return asyncio.run(run_demo(Path(args.out), requests=args.requests, seed=args.seed))


def cmd_report(args: argparse.Namespace) -> int:
    from proxy.ledger.base import AggregateRow, open_ledger
    from proxy.reports import (
        build_report,
        default_period,
        parse_day,
        render_html,
        report_csv,
        report_table,
    )

    try:
        cfg = _config(args.config)
        start_default, end_default = default_period()
        start = parse_day(args.date_from, start_default)
        end = parse_day(args.date_to, end_default)
    except ConfigError as err:
        _print_problems(err)
        return EXIT_CONFIG
    except ValueError:
        print("wattproxy: --from and --to must be ISO dates, e.g. 2026-11-01", file=sys.stderr)
        return EXIT_CONFIG

    if cfg.ledger.url.startswith("sqlite:"):
        from proxy.ledger.sqlite import SQLiteLedger

        path = Path(SQLiteLedger.from_url(cfg.ledger.url).path)
        if not path.is_file():  # never create an empty ledger just to report on it
            print(
                f"wattproxy: no ledger at {path.resolve()} (ledger.url {cfg.ledger.url})",
                file=sys.stderr,
            )
            return 1

    async def fetch() -> list[AggregateRow]:
        ledger = open_ledger(cfg.ledger.url, cfg.ledger.retention_days)
        await ledger.open()
        try:
            return await ledger.aggregates(start.isoformat(), end.isoformat(), user=args.user)
        finally:
            await ledger.close()

    try:
        rows = asyncio.run(fetch())
    except (LedgerError, ConfigError) as e:
        print(f"wattproxy: cannot read the ledger {cfg.ledger.url}: {e}", file=sys.stderr)
        return 1
    report = build_report(args.user, start, end, rows, args.group_by)
    if args.format == "json":
        out = json.dumps(report, indent=2)
    elif args.format == "csv":
        out = report_csv(report)
    elif args.format == "html":
        out = render_html(report, rows)
    else:
        out = report_table(report)
    if args.output:
        Path(args.output).write_text(out, "utf-8")
        print(f"wrote {args.output}")
    else:
        print(out)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wattproxy",
        description="A reverse proxy that meters the energy and carbon of AI inference requests.",
    )
    p.add_argument("--version", action="version", version=f"wattproxy {__version__}")
    p.add_argument("--log-level", default=None, choices=("debug", "info", "warning", "error"))
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the proxy")
    s.add_argument("--config", default=None, help="config file (default ./config.yaml if present)")
    s.add_argument(
        "--workers",
        default=None,
        type=_workers_arg,
        help="worker processes accepting on the port, or auto (one per core); overrides "
        "listen.workers",
    )
    s.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="run the whole pipeline locally with a simulated GPU")
    d.add_argument("--out", default="demo-output", help="folder for the ledger and metrics")
    d.add_argument("--requests", type=int, default=150)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument(
        "--scenario",
        choices=("tasks", "carbon-routing"),
        default="tasks",
        help="tasks: mixed load of many tasks (default); carbon-routing: two upstreams in two "
        "zones, traffic following the cleaner grid as the intensities change",
    )
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("report", help="a user's emissions from the ledger")
    r.add_argument("--user", required=True)
    r.add_argument("--from", dest="date_from", default=None)
    r.add_argument("--to", dest="date_to", default=None)
    r.add_argument("--group-by", default="day", choices=("day", "task", "model"))
    r.add_argument("--format", default="table", choices=("table", "json", "csv", "html"))
    r.add_argument("--output", "-o", default=None, help="write to this file")
    r.add_argument("--config", default=None)
    r.set_defaults(func=cmd_report)

    c = sub.add_parser("check-config", help="validate a config file")
    c.add_argument("path")
    c.set_defaults(func=cmd_check_config)

    from proxy import estimate_cli

    estimate_cli.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    level = args.log_level
    if level is None and getattr(args, "command", None) == "serve":
        try:
            level = _config(args.config).log.level
        except ConfigError:
            level = None  # cmd_serve reports it
    logging.basicConfig(
        level=(level or "info").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # the access log is JSON lines on stdout, without the plain-text prefix
    access = logging.getLogger("wattproxy.access")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.propagate = False
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
