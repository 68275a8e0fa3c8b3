"""The energy side of wattproxy. Its top level is the pure core, one module per concern, with no
I/O but reading a model folder, and no import of the HTTP side (``proxy``) or of the I/O
libraries (aiohttp, redis, prometheus_client, pynvml):

    attribution   interval energy -> requests (the invariant lives here); work profiles
    estimator     estimates of what was not measured: calibration > LLM model > task prior
    calibration   online per-upstream fits of measured energy against request features
    llm           per-token energy from a model's size, GPUs and batch
    model_card    what a model folder's config.json says: parameters, architectures, task
    priors        per-task figures (Power Hungry Processing), with source
    units         unit conversions, once where a reading enters or a figure leaves
    errors        the error tree of the energy side
    section       the base of every config.yaml section

The I/O shells are subpackages: ``estimators.meters`` (hardware meters, their factory and the
sampler) and ``estimators.carbon`` (grid intensity providers and the carbon clock). They import
the core; the core never imports them.
"""

from estimators import (
    attribution,
    calibration,
    errors,
    estimator,
    llm,
    model_card,
    priors,
    section,
    units,
)

__all__ = [
    "attribution",
    "calibration",
    "errors",
    "estimator",
    "llm",
    "model_card",
    "priors",
    "section",
    "units",
]
