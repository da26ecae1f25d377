"""What a worker holds on its device, and giving it back: the DeviceMemory report crossing the process boundary,
the executor taking the worker's word for its warm models, and the warm cache evicting for a job that does not
fit beside the pipelines it keeps (daemon.worker.cache.PipelineCache.fit_on_device). The end-to-end path, on
simulated cards, is tests/test_simulated_gpu.py."""

from __future__ import annotations

from daemon.worker.cache import Loaded, PipelineCache
from daemon.worker.protocol import (
    DeviceFree,
    DeviceInfo,
    DeviceMemory,
    Done,
    JobResult,
    Ready,
    WarmPipeline,
    event_from_wire,
    to_wire,
)


def entry(name: str, device_mb: float) -> Loaded:
    return Loaded(f"/m/{name}", {}, 0.0, size_mb=device_mb, model=name, device_mb=device_mb)


def test_the_memory_report_crosses_the_process_boundary_typed():
    memory = DeviceMemory(held_mb=15258, warm=(WarmPipeline("ti2v", "model", False, 0), WarmPipeline("a", "none")))
    for event in (
        Ready(pid=1, info=DeviceInfo("cuda"), memory=memory),
        DeviceFree("j", memory=memory),
        Done("j", JobResult("cuda", None, "cached", {}, []), memory=None),
    ):
        assert event_from_wire(to_wire(event)) == event


def test_a_job_that_does_not_fit_beside_the_warm_pipelines_evicts_the_least_recently_used_first():
    released = []
    cache = PipelineCache(max_entries=4, budget_mb=1e9, release=lambda: released.append(1))
    for name, mb in (("old", 30_000), ("mid", 20_000), ("new", 10_000), ("offloaded", 0)):
        cache.put(name, entry(name, mb))
    # 80 GiB of room, a 45 GiB job for "new": the others keep 50 GB, so "old" goes, and that is enough.
    assert cache.fit_on_device("new", 45_000, 81_920) == ["/m/old"]
    assert cache.keys() == ["mid", "new", "offloaded"] and released == [1]
    # The pipeline the job runs on is never evicted for it, and offloaded ones hold nothing on the device.
    assert cache.fit_on_device("new", 81_000, 81_920) == ["/m/mid"]
    assert cache.keys() == ["new", "offloaded"]
    assert cache.fit_on_device(None, 81_000, 81_920) == ["/m/new"] and cache.keys() == ["offloaded"]


def test_the_simulated_card_reports_what_nvml_would(tmp_path):
    import os

    from daemon.fsutil import atomic_write_json
    from daemon.ops.inventory import GpuInventory
    from daemon.testing import SIMULATED_GPUS, SimulatedGpus

    gpus = SimulatedGpus(tmp_path, [24576], other_mb=[1000])
    assert isinstance(gpus, GpuInventory)
    dead = 4_194_305  # above Linux's largest pid_max (2**22): no such process
    uuid = gpus.cards[0]["uuid"]
    for pid, held in ((os.getpid(), 15258), (dead, 9999)):
        atomic_write_json(tmp_path / SIMULATED_GPUS / f"{uuid}.held-{pid}.json", {"pid": pid, "held_mb": held})
    [card] = gpus.gpus()
    # Other processes' use and each live worker's holding are used memory; a dead process's is freed.
    assert (card.total_mb, card.used_mb, card.free_mb) == (24576, 16258, 8318)
    assert card.processes == ((os.getpid(), 15258),) and card.uuid == uuid
    gpus.set_other(0, 0)
    assert gpus.gpus()[0].free_mb == 24576 - 15258
