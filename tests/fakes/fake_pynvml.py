"""A stand-in for ``pynvml`` (nvidia-ml-py 12.x/13.x) driving scripted GPUs.

Same function names, constants (``nvmlReturn_t`` values, field ids, value types), the same
``NVMLError`` value semantics (``NVMLError(3)`` is an ``NVMLError_NotSupported``, compared by
``value``) and the same units: energy in mJ since the driver loaded, power in mW. Tests change a
``FakeGpu``'s counters between reads the way the hardware would.

    nvml = FakePynvml([FakeGpu("GPU-aaaa", energy_mj=1_000)])
    meter = NvmlMeter(nvml=nvml)
    nvml.gpus[0].energy_mj += 5_000  # the GPU drew 5 J
"""

from __future__ import annotations

import string
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# nvmlReturn_t (nvml.h)
NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_ALREADY_INITIALIZED = 5
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_INSUFFICIENT_SIZE = 7
NVML_ERROR_INSUFFICIENT_POWER = 8
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_IRQ_ISSUE = 11
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_CORRUPTED_INFOROM = 14
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_OPERATING_SYSTEM = 17
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_IN_USE = 19
NVML_ERROR_MEMORY = 20
NVML_ERROR_NO_DATA = 21
NVML_ERROR_GPU_NOT_FOUND = 28
NVML_ERROR_UNKNOWN = 999

# nvmlValueType_t
NVML_VALUE_TYPE_DOUBLE = 0
NVML_VALUE_TYPE_UNSIGNED_INT = 1
NVML_VALUE_TYPE_UNSIGNED_LONG = 2
NVML_VALUE_TYPE_UNSIGNED_LONG_LONG = 3
NVML_VALUE_TYPE_SIGNED_LONG_LONG = 4
NVML_VALUE_TYPE_SIGNED_INT = 5
NVML_VALUE_TYPE_UNSIGNED_SHORT = 6

# field ids
NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION = 83  # mJ since the driver loaded
NVML_FI_DEV_POWER_AVERAGE = 185  # mW, averaged over one second
NVML_FI_DEV_POWER_INSTANT = 186  # mW

NVML_DEVICE_MIG_DISABLE = 0
NVML_DEVICE_MIG_ENABLE = 1

_ERROR_STRINGS = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_ALREADY_INITIALIZED: "Already Initialized",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_TIMEOUT: "Timeout",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_RESET_REQUIRED: "GPU requires restart",
    NVML_ERROR_LIB_RM_VERSION_MISMATCH: "RM has detected an NVML/RM version mismatch.",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLError(Exception):
    """``NVMLError(code)`` builds the code's own subclass, as pynvml does."""

    _valClassMapping: dict[int, type[NVMLError]] = {}  # pynvml's name
    value: int

    def __new__(cls, value: int, *args: Any) -> NVMLError:
        if cls is NVMLError:
            cls = NVMLError._valClassMapping.get(value, NVMLError)
        obj = Exception.__new__(cls)
        obj.value = value
        return obj

    def __str__(self) -> str:
        return _ERROR_STRINGS.get(self.value, f"NVML Error with code {self.value}")

    def __eq__(self, other: object) -> bool:
        return self.value == getattr(other, "value", None)

    __hash__ = Exception.__hash__


def _error_classes() -> dict[str, type[NVMLError]]:
    """``NVMLError_NotSupported`` and friends, one subclass per ``NVML_ERROR_*`` code."""
    classes: dict[str, type[NVMLError]] = {}
    for const, code in list(globals().items()):
        if not const.startswith("NVML_ERROR_"):
            continue
        words = string.capwords(const.removeprefix("NVML_ERROR_"), "_").replace("_", "")

        def new(cls: type[NVMLError], *args: Any, _code: int = code) -> NVMLError:
            return NVMLError.__new__(cls, _code)

        cls = type(f"NVMLError_{words}", (NVMLError,), {"__new__": new})
        NVMLError._valClassMapping[code] = cls
        classes[cls.__name__] = cls
    return classes


_ERROR_CLASSES = _error_classes()
globals().update(_ERROR_CLASSES)


@dataclass
class FakeGpu:
    """One scripted GPU.

    Args:
        uuid: as ``nvmlDeviceGetUUID`` returns it (``GPU-...``).
        energy_mj: the driver's energy counter; ``None``: pre-Volta, no counter.
        power_mw: the power draw ``nvmlDeviceGetPowerUsage`` and the power fields report.
        power_fields: the driver knows ``NVML_FI_DEV_POWER_INSTANT`` (R530 and newer).
        mig_mode: ``[current, pending]``; ``None``: not MIG-capable (NOT_SUPPORTED).
        fail_with: an ``NVML_ERROR_*`` code every call on this GPU raises while set.
    """

    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    energy_mj: int | None = 0
    power_mw: int = 70_000
    power_fields: bool = True
    mig_mode: list[int] | None = field(default_factory=lambda: [0, 0])
    fail_with: int | None = None
    calls: list[str] = field(default_factory=list)

    def draw_mj(self, energy_mj: int) -> None:
        """Advance the energy counter, as the GPU drawing ``energy_mj`` would."""
        assert self.energy_mj is not None, "this GPU has no energy counter"
        self.energy_mj += energy_mj


@dataclass
class FakeHandle:
    """What ``nvmlDeviceGetHandleBy*`` returns: an opaque device pointer."""

    index: int


@dataclass
class FakeValue:
    """``c_nvmlValue_t``: a union read through the member ``valueType`` names."""

    dVal: float = 0.0
    uiVal: int = 0
    ulVal: int = 0
    ullVal: int = 0
    sllVal: int = 0
    siVal: int = 0
    usVal: int = 0


@dataclass
class FakeFieldValue:
    """``c_nvmlFieldValue_t``: one answer of ``nvmlDeviceGetFieldValues``."""

    fieldId: int
    scopeId: int = 0
    timestamp: int = 0
    latencyUsec: int = 0
    valueType: int = NVML_VALUE_TYPE_DOUBLE
    nvmlReturn: int = NVML_SUCCESS
    value: FakeValue = field(default_factory=FakeValue)


class FakePynvml(types.ModuleType):
    """A module object answering like ``pynvml`` for the GPUs in ``gpus``.

    Args:
        gpus: the GPUs, in NVML index order.
        library_found: ``False``: ``nvmlInit`` fails as on a machine without the driver.
    """

    NVMLError = NVMLError

    def __init__(self, gpus: Sequence[FakeGpu] = (), library_found: bool = True) -> None:
        super().__init__("pynvml")
        for name, value in globals().items():
            if name.startswith("NVML_") or name.startswith("NVMLError_"):
                setattr(self, name, value)
        self.gpus = list(gpus)
        self.library_found = library_found
        self.init_count = 0

    def _gpu(self, handle: FakeHandle, call: str) -> FakeGpu:
        if self.init_count == 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        gpu = self.gpus[handle.index]
        gpu.calls.append(call)
        if gpu.fail_with is not None:
            raise NVMLError(gpu.fail_with)
        return gpu

    def nvmlInit(self) -> None:
        self.nvmlInitWithFlags(0)

    def nvmlInitWithFlags(self, flags: int) -> None:
        if not self.library_found:
            raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
        self.init_count += 1

    def nvmlShutdown(self) -> None:
        if self.init_count == 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        self.init_count -= 1

    def nvmlDeviceGetCount(self) -> int:
        if self.init_count == 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        if self.init_count == 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        if not 0 <= index < len(self.gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return FakeHandle(index)

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> FakeHandle:
        if self.init_count == 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        wanted = uuid.decode() if isinstance(uuid, bytes) else uuid
        for index, gpu in enumerate(self.gpus):
            if gpu.uuid == wanted:
                return FakeHandle(index)
        raise NVMLError(NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str:
        return self._gpu(handle, "uuid").uuid

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str:
        return self._gpu(handle, "name").name

    def nvmlDeviceGetMigMode(self, handle: FakeHandle) -> list[int]:
        gpu = self._gpu(handle, "mig")
        if gpu.mig_mode is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return list(gpu.mig_mode)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeHandle) -> int:
        gpu = self._gpu(handle, "energy")
        if gpu.energy_mj is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return gpu.energy_mj

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        return self._gpu(handle, "power_usage").power_mw

    def nvmlDeviceGetFieldValues(
        self, handle: FakeHandle, fieldIds: Sequence[int]
    ) -> list[FakeFieldValue]:
        gpu = self._gpu(handle, "field_values")
        values = []
        for field_id in fieldIds:
            answer = FakeFieldValue(fieldId=field_id)
            if field_id in (NVML_FI_DEV_POWER_INSTANT, NVML_FI_DEV_POWER_AVERAGE) and (
                gpu.power_fields
            ):
                answer.valueType = NVML_VALUE_TYPE_UNSIGNED_INT
                answer.value.uiVal = gpu.power_mw
            elif field_id == NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION and gpu.energy_mj is not None:
                answer.valueType = NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
                answer.value.ullVal = gpu.energy_mj
            else:
                answer.nvmlReturn = NVML_ERROR_NOT_SUPPORTED
            values.append(answer)
        return values
