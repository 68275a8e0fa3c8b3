"""``wattproxy estimate``: the energy and carbon the estimators give one request, and on what
basis, without running the proxy. ``proxy/cli.py`` adds it through ``add_parser``; ``run`` is its
handler. The figures come from the energy side (``estimators``); this module only parses and
prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from estimators import llm, priors
from estimators.carbon import Intensity, fallback_intensity, table_intensity
from estimators.errors import CarbonError, EstimatorError
from estimators.estimator import Estimator, RequestShape
from estimators.units import J_PER_WH, co2e_g

UPSTREAM = "cli"
DEFAULT_ZONE = "WORLD"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _task(text: str) -> str:
    """A task the priors know; anything else is refused (it used to become text-generation)."""
    if text not in priors.known_tasks():
        raise argparse.ArgumentTypeError(
            f"unknown task {text!r}; known tasks: {', '.join(priors.known_tasks())}"
        )
    return text


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0.0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``estimate`` subcommand to ``subparsers`` (from ``add_subparsers()``); its
    handler is ``run``, also set as the ``func`` default."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "estimate",
        help="estimate one request's energy and CO2e without running the proxy",
        description=(
            "Estimate the energy (J, Wh) and emissions (g CO2e) of one request from its task, "
            "the model's size and the tokens, and say on what basis."
        ),
    )
    p.add_argument(
        "--task",
        type=_task,
        default=priors.DEFAULT_TASK,
        help=f"pipeline tag, one of {', '.join(priors.known_tasks())} (default %(default)s)",
    )
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model-path", help="local model folder; its config.json is counted")
    model.add_argument("--params-b", type=_positive_float, help="parameters, in billions")
    p.add_argument(
        "--active-params-b", type=_positive_float, help="active parameters of a MoE (billions)"
    )
    p.add_argument("--gpus", type=_positive_int, default=1, help="GPUs serving the model")
    p.add_argument(
        "--accelerator",
        default=llm.DEFAULT_ACCELERATOR,
        choices=sorted(llm.ACCELERATOR_FACTORS),
        help="accelerator (default %(default)s)",
    )
    p.add_argument("--prompt-tokens", type=_nonneg_int, help="prompt tokens")
    p.add_argument("--completion-tokens", type=_nonneg_int, help="generated tokens")
    p.add_argument(
        "--batch", type=_positive_int, default=1, help="requests served together (default 1)"
    )
    p.add_argument("--images", type=_positive_int, help="images generated (text-to-image)")
    p.add_argument("--zone", default=DEFAULT_ZONE, help="grid zone of the built-in table")
    p.add_argument(
        "--intensity-g-per-kwh", type=float, help="grid intensity to use instead of the table"
    )
    p.add_argument("--pue", type=float, default=1.0, help="facility PUE (default 1.0)")
    p.add_argument("--format", choices=("table", "json"), default="table", dest="output_format")
    p.set_defaults(func=run)
    return p


def _intensity(args: argparse.Namespace) -> Intensity:
    if args.intensity_g_per_kwh is not None:
        return Intensity(args.intensity_g_per_kwh, args.zone.upper(), "given")
    try:
        return table_intensity(args.zone)
    except CarbonError:
        return fallback_intensity(args.zone, "zone not in the table")


def estimate_request(args: argparse.Namespace) -> dict[str, Any]:
    """The estimate as a flat record (what ``--format json`` prints)."""
    if args.pue < 1.0:
        raise EstimatorError(f"--pue must be >= 1, got {args.pue}")
    if args.intensity_g_per_kwh is not None and args.intensity_g_per_kwh < 0:
        raise EstimatorError("--intensity-g-per-kwh must be >= 0")
    if args.active_params_b is not None and args.params_b is None:
        raise EstimatorError("--active-params-b needs --params-b")
    estimator = Estimator()
    info = None
    if args.model_path is not None:
        info = estimator.register_model(
            UPSTREAM, model_path=args.model_path, gpus=args.gpus, accelerator=args.accelerator
        )
    elif args.params_b is not None:
        info = estimator.register_model(
            UPSTREAM,
            params_b=args.params_b,
            active_params_b=args.active_params_b,
            gpus=args.gpus,
            accelerator=args.accelerator,
        )
    shape = RequestShape(
        upstream=UPSTREAM,
        model=info.name if info else None,
        task=args.task,
        prompt_tokens=args.prompt_tokens,
        completion_tokens=args.completion_tokens,
        images=args.images,
        concurrency=args.batch,
    )
    result = estimator.estimate(shape)
    intensity = _intensity(args)
    return {
        "task": args.task,
        "model": info.name if info else None,
        "params_b": round(info.total_params_b, 3) if info else None,
        "active_params_b": round(info.active_params_b, 3) if info else None,
        "gpus": args.gpus,
        "accelerator": args.accelerator,
        "batch": args.batch,
        "prompt_tokens": args.prompt_tokens,
        "completion_tokens": args.completion_tokens,
        "energy_j": result.energy_j,
        "energy_wh": result.energy_j / J_PER_WH,
        "co2e_g": co2e_g(result.energy_j, intensity.g_per_kwh, args.pue),
        "zone": intensity.zone,
        "intensity_g_per_kwh": intensity.g_per_kwh,
        "intensity_source": intensity.source,
        "pue": args.pue,
        "method": result.method,
        "basis": result.basis,
    }


def _count(tokens: int | None) -> str:
    return "unknown" if tokens is None else str(tokens)


def _table(record: dict[str, Any]) -> str:
    params = "-"
    if record["params_b"] is not None:
        params = f"{record['params_b']:g}B"
        if record["active_params_b"] != record["params_b"]:
            params = f"{record['active_params_b']:g}B active of {params}"
    rows = [
        ("task", record["task"]),
        ("model", record["model"] or "-"),
        ("parameters", params),
        ("hardware", f"{record['gpus']}x {record['accelerator']}, batch {record['batch']}"),
        (
            "tokens",
            f"{_count(record['prompt_tokens'])} prompt, "
            f"{_count(record['completion_tokens'])} completion",
        ),
        ("energy", f"{record['energy_j']:.4g} J = {record['energy_wh']:.4g} Wh"),
        (
            "carbon",
            f"{record['co2e_g']:.4g} g CO2e at {record['intensity_g_per_kwh']:g} g/kWh "
            f"({record['zone']}, {record['intensity_source']}), PUE {record['pue']:g}",
        ),
        ("method", record["method"]),
        ("basis", record["basis"]),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Print the estimate; 0 on success, 2 on a bad input (message on stderr)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        record = estimate_request(args)
    except EstimatorError as e:
        print(f"wattproxy estimate: error: {e}", file=err)
        return 2
    if args.output_format == "json":
        print(json.dumps(record, indent=2), file=out)
    else:
        print(_table(record), file=out)
    return 0
