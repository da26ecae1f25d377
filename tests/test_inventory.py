"""GPU inventory (daemon/inventory.py): CUDA_VISIBLE_DEVICES semantics, NVML reading through a fake
NVML module, the static inventory, and the real NVML path where this host has a driver."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from daemon.ops.inventory import (
    GpuInfo,
    GpuInventory,
    NvmlInventory,
    StaticInventory,
    nvml_unavailable_reason,
    parse_visible_devices,
)

MIB = 1 << 20


@pytest.mark.parametrize(
    "text,expected",
    [
        (None, None),  # unset: every GPU
        ("", []),  # set but empty: none
        ("0", ["0"]),
        ("1,0", ["1", "0"]),  # order matters: CUDA index 0 is physical 1
        (" 2 , 3 ", ["2", "3"]),
        ("01", ["1"]),
        ("-1", []),  # the usual way to hide every GPU
        ("0,-1,1", ["0"]),  # CUDA stops at the first invalid entry
        ("0,,1", ["0"]),
        ("0,abc,1", ["0"]),
        ("0,0,1", ["0", "1"]),
        ("GPU-8932f937-d72c-4106-c12f-20bd9faed9f6,1", ["GPU-8932f937-d72c-4106-c12f-20bd9faed9f6", "1"]),
        ("GPU-8932f937", ["GPU-8932f937"]),  # a unique prefix is allowed
        ("MIG-5c89852c-d268-c3f3-1b07-005d5ae1dc3f", ["MIG-5c89852c-d268-c3f3-1b07-005d5ae1dc3f"]),
    ],
)
def test_parse_visible_devices(text, expected):
    assert parse_visible_devices(text) == expected


# ---- NvmlInventory on a fake NVML ---------------------------------------------------------------------


class NVMLError(Exception):
    pass


class FakeNvml:
    """The subset of pynvml that NvmlInventory uses, over a list of device dicts."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, devices, *, init_error=None):
        self.devices = devices
        self.init_error = init_error
        self.inits = self.shutdowns = 0

    def nvmlInit(self):
        if self.init_error:
            raise self.init_error
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i):
        return self.devices[i]

    def nvmlDeviceGetUUID(self, h):
        return h["uuid"].encode()  # old pynvml returns bytes

    def nvmlDeviceGetName(self, h):
        return h["name"]

    def nvmlDeviceGetMemoryInfo(self, h):
        if h.get("broken"):
            raise NVMLError("GPU is lost")
        return SimpleNamespace(total=h["total"] * MIB, used=h["used"] * MIB, free=(h["total"] - h["used"]) * MIB)

    def nvmlDeviceGetUtilizationRates(self, h):
        if "util" not in h:
            raise NVMLError("Not Supported")
        return SimpleNamespace(gpu=h["util"], memory=0)

    def nvmlDeviceGetTemperature(self, h, sensor):
        assert sensor == self.NVML_TEMPERATURE_GPU
        return h["temp"]

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [SimpleNamespace(pid=pid, usedGpuMemory=None if mb is None else mb * MIB) for pid, mb in h["procs"]]


def devices():
    return [
        {
            "uuid": "GPU-aaaa-0000",
            "name": "NVIDIA H100 80GB HBM3",
            "total": 81559,
            "used": 1000,
            "util": 10,
            "temp": 40,
            "procs": [(111, 900)],
        },
        {"uuid": "GPU-bbbb-1111", "name": "NVIDIA H100 80GB HBM3", "total": 81559, "used": 0, "temp": 35, "procs": []},
        {
            "uuid": "GPU-cccc-2222",
            "name": "NVIDIA RTX 4090",
            "total": 24564,
            "used": 20000,
            "util": 99,
            "temp": 70,
            "procs": [(222, 19000), (333, None)],
        },
    ]


def test_all_gpus_when_cuda_visible_devices_is_unset():
    nvml = FakeNvml(devices())
    gpus = NvmlInventory(nvml=nvml).gpus()
    assert [(g.index, g.physical_index, g.uuid) for g in gpus] == [
        (0, 0, "GPU-aaaa-0000"),
        (1, 1, "GPU-bbbb-1111"),
        (2, 2, "GPU-cccc-2222"),
    ]
    first = gpus[0]
    assert (first.name, first.total_mb, first.used_mb, first.free_mb) == ("NVIDIA H100 80GB HBM3", 81559, 1000, 80559)
    assert (first.utilization_percent, first.temperature_c, first.processes) == (10, 40, ((111, 900),))
    assert gpus[1].utilization_percent is None  # "Not Supported" is not an error
    assert gpus[2].processes == ((222, 19000), (333, None))
    assert nvml.inits == nvml.shutdowns == 1


@pytest.mark.parametrize(
    "visible,allowed,expected",
    [
        # (CUDA index, physical index) pairs: CUDA renumbers the visible devices 0..n-1 in the listed order.
        ("2,0", None, [(0, 2), (1, 0)]),
        ("GPU-cccc,GPU-aaaa-0000", None, [(0, 2), (1, 0)]),  # UUIDs and unique prefixes
        ("GPU-", None, []),  # ambiguous prefix: CUDA stops there
        ("GPU-ffff", None, []),  # no such GPU
        ("1,7,2", None, [(0, 1)]),  # index 7 does not exist: CUDA stops there
        ("", None, []),
        ("-1", None, []),
        (None, [1, 2], [(1, 1), (2, 2)]),  # hardware.gpus filters by CUDA index
        ("2,1,0", [0, 2], [(0, 2), (2, 0)]),
        ("2", [1], []),
        ("MIG-5c89852c-d268-c3f3-1b07-005d5ae1dc3f", None, []),  # MIG slices are not inventoried
    ],
)
def test_visible_devices_and_allowed_list(visible, allowed, expected):
    gpus = NvmlInventory(visible_devices=visible, allowed=allowed, nvml=FakeNvml(devices())).gpus()
    assert [(g.index, g.physical_index) for g in gpus] == expected


@pytest.mark.parametrize(
    "limit_gb,expected",
    [
        (None, [(81559, 80559), (81559, 81559), (24564, 4564)]),
        (40, [(40960, 39960), (40960, 40960), (24564, 4564)]),
        (20, [(20480, 19480), (20480, 20480), (20480, 480)]),
        (19, [(19456, 18456), (19456, 19456), (19456, 0)]),  # used above the cap: nothing free, never negative
    ],
)
def test_vram_limit_caps_total_and_free(limit_gb, expected):
    gpus = NvmlInventory(vram_limit_gb=limit_gb, nvml=FakeNvml(devices())).gpus()
    assert [(g.total_mb, g.free_mb) for g in gpus] == expected


def test_any_nvml_failure_means_no_gpus():
    lib_missing = FakeNvml(devices(), init_error=NVMLError("NVML Shared Library Not Found"))
    assert NvmlInventory(nvml=lib_missing).gpus() == []
    assert nvml_unavailable_reason(lib_missing) == "NVMLError: NVML Shared Library Not Found"
    broken = devices()
    broken[1]["broken"] = True
    nvml = FakeNvml(broken)
    assert NvmlInventory(nvml=nvml).gpus() == []
    assert nvml.shutdowns == 1  # shut down even after an error
    assert nvml_unavailable_reason(FakeNvml(devices())) is None


# ---- StaticInventory ---------------------------------------------------------------------------------


def gpu(index, total=24576, free=None):
    free = total if free is None else free
    return GpuInfo(index, f"gpu{index}", total, total - free, free)


def test_static_inventory_returns_copies_and_simulates_allocations():
    inv = StaticInventory([gpu(0), gpu(1, total=81920)])
    assert isinstance(inv, GpuInventory) and isinstance(NvmlInventory(), GpuInventory)
    listed = inv.gpus()
    listed.clear()
    assert len(inv.gpus()) == 2  # the caller's list is its own
    assert inv.with_free(1, 1000) is inv
    g = inv.gpus()[1]
    assert (g.free_mb, g.used_mb, g.total_mb) == (1000, 80920, 81920)
    assert inv.gpus()[0].free_mb == 24576
    with pytest.raises(KeyError):
        inv.with_free(5, 0)
    with pytest.raises(ValueError):
        inv.with_free(0, 30000)
    assert StaticInventory([]).gpus() == []
    assert GpuInfo(0, "x", 1, 0, 1).physical_index == -1


def _uses(inventory: GpuInventory) -> list[int]:  # the Protocol is structural: both classes satisfy it
    return [g.free_mb for g in inventory.gpus()]


def test_both_inventories_satisfy_the_protocol():
    assert _uses(StaticInventory([gpu(0, free=7)])) == [7]
    assert _uses(NvmlInventory(visible_devices="1", nvml=FakeNvml(devices()))) == [81559]


# ---- the real NVML on this host ---------------------------------------------------------------------------


def test_real_nvml_inventory():
    reason = nvml_unavailable_reason()
    if reason is not None:
        assert nvml_unavailable_reason() is not None
        assert NvmlInventory().gpus() == []  # a CPU-only host: no GPUs, no exception
        pytest.skip(f"NVML not available on this host: {reason}")
    assert nvml_unavailable_reason() is None
    gpus = NvmlInventory().gpus()
    assert gpus, "NVML initialised but reported no GPU"
    for n, g in enumerate(gpus):
        assert g.index == n == g.physical_index
        assert g.total_mb > 0 and 0 <= g.free_mb <= g.total_mb and g.used_mb >= 0
        assert g.uuid and g.uuid.startswith(("GPU-", "MIG-"))
    last = gpus[-1]
    only_last = NvmlInventory(visible_devices=last.uuid).gpus()
    assert [(g.index, g.physical_index) for g in only_last] == [(0, last.physical_index)]
    capped = NvmlInventory(vram_limit_gb=1).gpus()
    assert all(g.total_mb <= 1024 for g in capped)
    assert NvmlInventory(visible_devices="").gpus() == []
