"""Which GPUs this daemon may use and how much memory each has free, without importing torch.

:class:`GpuInventory` is the interface the scheduler's caller reads; :class:`NvmlInventory` asks the
driver through NVML (pynvml, from nvidia-ml-py), :class:`StaticInventory` is a fixed list (tests, CPU
hosts, simulations).

Numbering follows CUDA, because the worker will address the GPU by its CUDA index: when
``CUDA_VISIBLE_DEVICES`` lists devices, CUDA renumbers them 0..n-1 in the listed order, so
``GpuInfo.index`` is that CUDA index and ``GpuInfo.physical_index`` NVML's own index. NVML enumerates in
PCI bus order; CUDA does too only with ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (its default, FASTEST_FIRST, can
differ on hosts with mixed GPUs), so workers should be started with that variable set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

from loguru import logger


@dataclass(frozen=True)
class GpuInfo:
    index: int  # CUDA index, as the worker will see it (after CUDA_VISIBLE_DEVICES renumbering)
    name: str
    total_mb: int
    used_mb: int
    free_mb: int
    utilization_percent: int | None = None
    temperature_c: int | None = None
    processes: tuple = ()  # ((pid, used_mb or None), ...): compute processes on this GPU
    physical_index: int = -1  # NVML's index (-1: unknown, e.g. a StaticInventory entry)
    uuid: str | None = None


@runtime_checkable
class GpuInventory(Protocol):
    def gpus(self) -> list[GpuInfo]: ...


# ---- CUDA_VISIBLE_DEVICES -----------------------------------------------------------------------

_INDEX = re.compile(r"\d+")
_UUID = re.compile(r"(GPU|MIG)-[0-9A-Za-z-]+")


def parse_visible_devices(text: str | None) -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` as CUDA reads it: None (unset) -> None, all devices; otherwise the
    entries, in order, up to the first invalid one (CUDA ignores it and everything after it, so ``"-1"``
    hides every device and ``"0,-1,1"`` shows only 0). Entries are indices or GPU UUIDs (``GPU-…``,
    possibly a unique prefix) or MIG UUIDs; blanks around commas are ignored; a repeated entry is dropped."""
    if text is None:
        return None
    out: list[str] = []
    for raw in text.split(","):
        token = raw.strip()
        if _INDEX.fullmatch(token):
            token = str(int(token))
        elif not _UUID.fullmatch(token):
            break
        if token not in out:
            out.append(token)
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _resolve(entries: list[str] | None, count: int, uuids: list[str]) -> list[int]:
    """Physical indices of the visible devices, in CUDA order."""
    if entries is None:
        return list(range(count))
    out: list[int] = []
    for entry in entries:
        if entry.isdigit():
            phys = int(entry)
            if phys >= count:
                logger.debug("inventory.visible_device_missing entry={} count={}; CUDA stops here", entry, count)
                break
        elif entry.startswith("GPU-"):
            matches = [i for i, u in enumerate(uuids) if u.startswith(entry)]
            if len(matches) != 1:
                logger.debug(
                    "inventory.visible_uuid_unmatched entry={} matches={}; CUDA stops here", entry, len(matches)
                )
                break
            phys = matches[0]
        else:  # MIG instances: not inventoried (their memory is a slice NVML reports per instance)
            logger.debug("inventory.visible_mig_unsupported entry={}; stopping here", entry)
            break
        if phys not in out:
            out.append(phys)
    return out


# ---- NVML -----------------------------------------------------------------------------------------


def _import_pynvml() -> Any:
    import pynvml

    return pynvml


def nvml_unavailable_reason(nvml: Any = None) -> str | None:
    """None when NVML initialises here, else why not (the NVML error text)."""
    try:
        nvml = nvml or _import_pynvml()
        nvml.nvmlInit()
    except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return f"{type(exc).__name__}: {exc}"
    try:
        nvml.nvmlShutdown()
    except Exception:
        pass
    return None


class NvmlInventory:
    """The GPUs NVML reports, seen through ``CUDA_VISIBLE_DEVICES``, the configured GPU list and a VRAM cap.

    - ``visible_devices``: the ``CUDA_VISIBLE_DEVICES`` string the CLI read (None: unset, every GPU).
    - ``allowed``: CUDA indices this daemon may use (config ``hardware.gpus``); None: all visible ones.
    - ``vram_limit_gb``: at most this many GiB per GPU: ``total = min(total, cap)``,
      ``free = max(0, min(free, cap - used))``.
    - ``nvml``: the pynvml module to use (tests pass a fake); default: ``import pynvml``.

    Any NVML failure (no library, no driver, a device error) yields ``[]`` and a debug log line: a host
    without a usable NVIDIA GPU is a CPU host. Each call initialises and shuts NVML down again.
    """

    def __init__(
        self,
        *,
        visible_devices: str | None = None,
        allowed: list[int] | None = None,
        vram_limit_gb: float | None = None,
        nvml: Any = None,
    ) -> None:
        self.visible = parse_visible_devices(visible_devices)
        self.allowed = None if allowed is None else frozenset(int(i) for i in allowed)
        self.cap_mb = None if vram_limit_gb is None else int(vram_limit_gb * 1024)
        self._nvml = nvml

    def gpus(self) -> list[GpuInfo]:
        try:
            nvml = self._nvml or _import_pynvml()
            nvml.nvmlInit()
        except Exception as exc:
            logger.debug("inventory.nvml_unavailable error={}: {}", type(exc).__name__, exc)
            return []
        try:
            return self._read(nvml)
        except Exception as exc:
            logger.debug("inventory.nvml_error error={}: {}", type(exc).__name__, exc)
            return []
        finally:
            try:
                nvml.nvmlShutdown()
            except Exception:
                pass

    def _read(self, nvml: Any) -> list[GpuInfo]:
        count = int(nvml.nvmlDeviceGetCount())
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        needs_uuids = self.visible is not None and any(e.startswith("GPU-") for e in self.visible)
        uuids = [_text(nvml.nvmlDeviceGetUUID(h)) for h in handles] if needs_uuids else []
        out = []
        for cuda_index, phys in enumerate(_resolve(self.visible, count, uuids)):
            if self.allowed is not None and cuda_index not in self.allowed:
                continue
            out.append(self._info(nvml, handles[phys], cuda_index, phys, uuids[phys] if uuids else None))
        return out

    def _info(self, nvml: Any, handle: Any, cuda_index: int, phys: int, uuid: str | None) -> GpuInfo:
        mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        mib = 1 << 20
        total, used, free = int(mem.total) // mib, int(mem.used) // mib, int(mem.free) // mib
        if self.cap_mb is not None:
            total = min(total, self.cap_mb)
            free = max(0, min(free, self.cap_mb - used))
        util = temp = None
        try:
            util = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:  # not supported (MIG, some vGPUs)
            pass
        try:
            temp = int(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
        except Exception:
            pass
        procs: tuple = ()
        try:
            procs = tuple(
                (int(p.pid), None if getattr(p, "usedGpuMemory", None) is None else int(p.usedGpuMemory) // mib)
                for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            )
        except Exception:
            pass
        if uuid is None:
            try:
                uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            except Exception:
                uuid = None
        return GpuInfo(
            cuda_index,
            _text(nvml.nvmlDeviceGetName(handle)),
            total,
            used,
            free,
            util,
            temp,
            procs,
            physical_index=phys,
            uuid=uuid,
        )


class StaticInventory:
    """A fixed list of GPUs (tests, CPU hosts: ``StaticInventory([])``); ``with_free`` simulates allocations."""

    def __init__(self, gpus: list[GpuInfo]) -> None:
        self._gpus = list(gpus)

    def gpus(self) -> list[GpuInfo]:
        return [replace(g) for g in self._gpus]

    def with_free(self, index: int, free_mb: int) -> StaticInventory:
        """Set GPU ``index``'s (CUDA index) free memory, ``used = total - free``, in place; returns self.
        KeyError if there is no such GPU; ValueError if ``free_mb`` is outside 0..total."""
        for n, g in enumerate(self._gpus):
            if g.index == index:
                if not 0 <= free_mb <= g.total_mb:
                    raise ValueError(f"free_mb {free_mb} is outside 0..{g.total_mb} for GPU {index}")
                self._gpus[n] = replace(g, free_mb=int(free_mb), used_mb=g.total_mb - int(free_mb))
                return self
        raise KeyError(f"no GPU with index {index}")
