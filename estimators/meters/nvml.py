"""NVIDIA GPUs through NVML (the ``nvidia-ml-py`` package, imported as ``pynvml``).

Energy comes from the driver's own counter (``nvmlDeviceGetTotalEnergyConsumption``, mJ since the
driver loaded, Volta and newer): it misses nothing between reads, however slow they are. Older
GPUs fall back to polling power (``NVML_FI_DEV_POWER_INSTANT`` where the driver knows it, else
``nvmlDeviceGetPowerUsage``, both mW) integrated by the trapezoid rule, which is only as good as
the sampling rate. A GPU reset restarts the counter near zero; ``EnergyCounter`` absorbs it.

MIG-enabled GPUs are refused: NVML gives one figure for the whole card, which would be charged
to whichever instance's server is busy. DCGM (the ``dcgm`` meter) is the tool for MIG hosts.

Every ``pynvml.NVMLError`` is translated in one place (``_translate_nvml_errors``) into
``MeterError`` or, where the machine simply has no usable NVIDIA driver, ``MeterUnavailable``.
"""

from __future__ import annotations

import enum
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar

from estimators.errors import MeterError, MeterUnavailable
from estimators.meters.base import (
    EnergyCounter,
    GpuSelector,
    Meter,
    PowerIntegrator,
    Reading,
    Sample,
    read_each,
)
from estimators.units import MJ_PER_J, MW_PER_W

log = logging.getLogger("wattproxy.meter.nvml")

EnergySource = Literal["counter", "power_field", "power_usage"]


class _Ret(enum.IntEnum):
    """nvmlReturn_t (nvml.h): part of the C ABI, identical in every pynvml release."""

    SUCCESS = 0
    UNINITIALIZED = 1
    INVALID_ARGUMENT = 2
    NOT_SUPPORTED = 3
    NO_PERMISSION = 4
    NOT_FOUND = 6
    INSUFFICIENT_POWER = 8
    DRIVER_NOT_LOADED = 9
    TIMEOUT = 10
    LIBRARY_NOT_FOUND = 12
    FUNCTION_NOT_FOUND = 13
    GPU_IS_LOST = 15
    RESET_REQUIRED = 16
    LIB_RM_VERSION_MISMATCH = 18
    GPU_NOT_FOUND = 28


#: Codes that mean "this GPU or driver cannot do that", so a fallback is tried.
_UNSUPPORTED = frozenset({_Ret.INVALID_ARGUMENT, _Ret.NOT_SUPPORTED, _Ret.FUNCTION_NOT_FOUND})

#: code -> (error class, what an operator should know). Codes not listed: a plain MeterError.
_ERRORS: dict[int, tuple[type[MeterError], str]] = {
    _Ret.UNINITIALIZED: (MeterError, "NVML is not initialized"),
    _Ret.INVALID_ARGUMENT: (MeterError, "invalid argument; is the GPU index beyond the count?"),
    _Ret.NOT_SUPPORTED: (MeterError, "not supported by this GPU or driver"),
    _Ret.NO_PERMISSION: (MeterError, "permission denied; the process needs /dev/nvidia* access"),
    _Ret.NOT_FOUND: (MeterError, "no GPU with that UUID; check meter.devices (nvidia-smi -L)"),
    _Ret.INSUFFICIENT_POWER: (MeterError, "a GPU power cable is not connected"),
    _Ret.DRIVER_NOT_LOADED: (MeterUnavailable, "the NVIDIA kernel driver is not loaded"),
    _Ret.TIMEOUT: (MeterError, "the driver timed out"),
    _Ret.LIBRARY_NOT_FOUND: (
        MeterUnavailable,
        "libnvidia-ml.so was not found: no NVIDIA driver on this machine",
    ),
    _Ret.FUNCTION_NOT_FOUND: (MeterError, "this driver is too old for the call"),
    _Ret.GPU_IS_LOST: (MeterError, "the GPU fell off the bus or is otherwise inaccessible"),
    _Ret.RESET_REQUIRED: (MeterError, "the GPU needs a reset"),
    _Ret.LIB_RM_VERSION_MISMATCH: (
        MeterUnavailable,
        "NVML library and kernel driver versions differ; reload the driver",
    ),
    _Ret.GPU_NOT_FOUND: (MeterError, "the GPU was not found"),
}

#: ``c_nvmlFieldValue_t.valueType`` -> the member of the ``value`` union that holds it.
_VALUE_MEMBERS = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")

P = ParamSpec("P")
R = TypeVar("R")


def _import_pynvml() -> ModuleType:
    """The real ``pynvml``, imported only when an NVML meter is wanted."""
    try:
        import pynvml
    except ImportError as e:
        raise MeterUnavailable(
            "nvml: the nvidia-ml-py package is not installed (pip install 'wattproxy[nvml]')"
        ) from e
    return pynvml


def _translate_nvml_errors(
    what: str,
) -> Callable[[Callable[Concatenate[NvmlMeter, P], R]], Callable[Concatenate[NvmlMeter, P], R]]:
    """Turn ``pynvml.NVMLError`` raised by the wrapped method into ``MeterError``, with a hint."""

    def decorate(
        method: Callable[Concatenate[NvmlMeter, P], R],
    ) -> Callable[Concatenate[NvmlMeter, P], R]:
        @functools.wraps(method)
        def wrapper(self: NvmlMeter, *args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return method(self, *args, **kwargs)
            except self._nvml.NVMLError as e:
                code: int = getattr(e, "value", -1)
                cls, hint = _ERRORS.get(code, (MeterError, ""))
                detail = f"{e} ({hint})" if hint else str(e)
                raise cls(f"nvml: {what}: {detail}") from e

        return wrapper

    return decorate


class _MigEnabled(MeterError):
    """Raised while opening: a MIG card is a configuration problem that no retry fixes."""


@dataclass(slots=True)
class _Gpu:
    """One GPU's handle and energy bookkeeping; the handle is dropped after a failed read."""

    selector: GpuSelector
    handle: Any = None
    source: EnergySource | None = None
    counter: EnergyCounter = field(default_factory=EnergyCounter)
    integrator: PowerIntegrator = field(default_factory=PowerIntegrator)
    last_energy_j: float | None = None
    last_t_s: float | None = None


class NvmlMeter(Meter):
    """Cumulative energy of NVIDIA GPUs, from NVML.

    Args:
        devices: device name -> NVML index or UUID; default every GPU, named gpu0, gpu1, ...
        nvml: the ``pynvml`` module (tests pass a fake); default the installed nvidia-ml-py.
        clock: monotonic clock in seconds.

    Raises:
        MeterUnavailable: no nvidia-ml-py, no driver, or no GPU.
        MeterError: a GPU has MIG enabled, or none of the GPUs could be opened.
    """

    kind = "nvml"

    def __init__(
        self,
        devices: Mapping[str, GpuSelector] | None = None,
        *,
        nvml: ModuleType | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._nvml = nvml if nvml is not None else _import_pynvml()
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = False
        self._init()
        try:
            self._gpus = self._open_all(devices)
        except BaseException:
            self._shutdown()
            raise

    @classmethod
    def is_available(cls, nvml: ModuleType | None = None) -> bool:
        """Whether NVML initializes and sees at least one GPU."""
        try:
            mod = nvml if nvml is not None else _import_pynvml()
        except MeterUnavailable:
            return False
        try:
            mod.nvmlInit()
        except mod.NVMLError:
            return False
        try:
            return int(mod.nvmlDeviceGetCount()) > 0
        except mod.NVMLError:
            return False
        finally:
            try:
                mod.nvmlShutdown()
            except mod.NVMLError:
                pass

    def devices(self) -> list[str]:
        return list(self._gpus)

    def read(self) -> Reading:
        with self._lock:
            t_s = self._clock()

            def sample(name: str) -> Sample:
                gpu = self._gpus[name]
                try:
                    if gpu.handle is None:
                        self._open(name, gpu, t_s)
                    return self._sample(name, gpu, t_s)
                except MeterError:
                    gpu.handle = None  # resolve it again next time: the GPU may have come back
                    raise

            return read_each("nvml", t_s, self._gpus, sample, unit="GPU")

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._shutdown()

    # -- opening ---------------------------------------------------------------------------

    @_translate_nvml_errors("cannot initialize NVML")
    def _init(self) -> None:
        self._nvml.nvmlInit()

    def _shutdown(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError as e:
            log.debug("nvmlShutdown failed: %s", e)

    @_translate_nvml_errors("cannot count GPUs")
    def _count(self) -> int:
        return int(self._nvml.nvmlDeviceGetCount())

    def _open_all(self, devices: Mapping[str, GpuSelector] | None) -> dict[str, _Gpu]:
        selectors = dict(devices) if devices else {f"gpu{i}": i for i in range(self._count())}
        if not selectors:
            raise MeterUnavailable("nvml: NVML answers but sees no GPU")
        gpus = {name: _Gpu(selector) for name, selector in selectors.items()}
        problems: dict[str, str] = {}
        t_s = self._clock()
        for name, gpu in gpus.items():
            try:
                self._open(name, gpu, t_s)
            except _MigEnabled:
                raise
            except MeterError as e:
                problems[name] = str(e)
                log.warning("%s (%s) cannot be opened yet, will retry: %s", name, gpu.selector, e)
        if len(problems) == len(gpus):
            raise MeterError(
                "nvml: none of the GPUs could be opened: "
                + "; ".join(f"{name}: {reason}" for name, reason in problems.items())
            )
        return gpus

    def _open(self, name: str, gpu: _Gpu, t_s: float) -> None:
        """Resolve the handle, refuse MIG, pick the energy source and take a first sample."""
        handle = self._handle(gpu.selector)
        if self._mig_enabled(handle):
            raise _MigEnabled(
                f"nvml: {name} ({gpu.selector}) has MIG enabled, and NVML reports energy for "
                "the whole card, not per instance; use meter.kind: dcgm with dcgm-exporter"
            )
        if gpu.source is None:
            gpu.source = self._probe_source(handle)
            log.info("%s (%s): energy from %s", name, gpu.selector, gpu.source)
        gpu.handle = handle
        if gpu.last_t_s is None:
            self._sample(name, gpu, t_s)  # the baseline: energy counts from here

    @_translate_nvml_errors("cannot open GPU")
    def _handle(self, selector: GpuSelector) -> Any:
        if isinstance(selector, int):
            return self._nvml.nvmlDeviceGetHandleByIndex(selector)
        return self._nvml.nvmlDeviceGetHandleByUUID(selector)

    @_translate_nvml_errors("cannot read the MIG mode")
    def _mig_enabled(self, handle: Any) -> bool:
        nvml = self._nvml
        try:
            current, _pending = nvml.nvmlDeviceGetMigMode(handle)
        except nvml.NVMLError as e:
            if getattr(e, "value", None) in _UNSUPPORTED:
                return False  # not a MIG-capable GPU
            raise
        return bool(current == getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1))

    @_translate_nvml_errors("cannot find a way to read energy or power")
    def _probe_source(self, handle: Any) -> EnergySource:
        nvml = self._nvml
        try:
            nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            return "counter"
        except nvml.NVMLError as e:
            if getattr(e, "value", None) not in _UNSUPPORTED:
                raise
        if hasattr(nvml, "NVML_FI_DEV_POWER_INSTANT"):
            try:
                self._field_power_mw(handle)
                return "power_field"
            except nvml.NVMLError as e:
                if getattr(e, "value", None) not in _UNSUPPORTED:
                    raise
        nvml.nvmlDeviceGetPowerUsage(handle)
        return "power_usage"

    # -- reading ---------------------------------------------------------------------------

    @_translate_nvml_errors("read failed")
    def _sample(self, name: str, gpu: _Gpu, t_s: float) -> tuple[float, float | None]:
        """Cumulative joules and watts now; counter-backed power is the interval's average."""
        nvml = self._nvml
        power_w: float | None
        if gpu.source == "counter":
            raw_j = nvml.nvmlDeviceGetTotalEnergyConsumption(gpu.handle) / MJ_PER_J
            resets = gpu.counter.resets
            energy_j = gpu.counter.update(raw_j)
            if gpu.counter.resets != resets:
                log.warning(
                    "%s: the NVML energy counter went back (GPU reset or driver reload); "
                    "counting on from its new value",
                    name,
                )
            power_w = None
            if gpu.last_t_s is not None and gpu.last_energy_j is not None and t_s > gpu.last_t_s:
                power_w = (energy_j - gpu.last_energy_j) / (t_s - gpu.last_t_s)
        else:
            if gpu.source == "power_field":
                power_mw = self._field_power_mw(gpu.handle)
            else:
                power_mw = float(nvml.nvmlDeviceGetPowerUsage(gpu.handle))
            power_w = power_mw / MW_PER_W
            energy_j = gpu.integrator.update(t_s, power_w)
        gpu.last_energy_j = energy_j
        gpu.last_t_s = t_s
        return energy_j, power_w

    def _field_power_mw(self, handle: Any) -> float:
        """``NVML_FI_DEV_POWER_INSTANT`` in mW; a per-field error is raised as ``NVMLError``."""
        nvml = self._nvml
        (answer,) = nvml.nvmlDeviceGetFieldValues(handle, [nvml.NVML_FI_DEV_POWER_INSTANT])
        if answer.nvmlReturn != _Ret.SUCCESS:
            raise nvml.NVMLError(answer.nvmlReturn)
        return float(getattr(answer.value, _VALUE_MEMBERS[answer.valueType]))
