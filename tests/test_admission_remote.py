"""Admission under Ray: the GPUs that count are the actors' (on other hosts, known once each is Ready), not the
daemon host's own inventory, which may have none."""

from __future__ import annotations

from types import SimpleNamespace

from daemon.config import load_settings
from daemon.memory import PeakBook
from daemon.ops.inventory import GpuInfo, StaticInventory
from daemon.runtime.admission import Admission
from daemon.testing import make_record


def admission(tmp_path, *, host_gpus=()) -> Admission:
    settings = load_settings(None, {"paths": {"inbox": str(tmp_path / "in"), "outbox": str(tmp_path / "out")}})
    gpus = list(host_gpus)
    book = SimpleNamespace(downloads=SimpleNamespace(wanted=None))  # only where admission hooks its question
    return Admission(settings, book, gpus=gpus, inventory=StaticInventory(gpus), peaks=PeakBook(tmp_path / "p.json"))


def gpu(total_gib: int, index: int = 1000) -> GpuInfo:
    mb = total_gib * 1024
    return GpuInfo(index=index, name="remote", total_mb=mb, used_mb=0, free_mb=mb)


def real_job():
    return make_record("r", model="wan2.2-ti2v-5b", params={"width": 1280, "height": 704, "frames": 121})


def test_a_gpu_less_host_refuses_real_models_for_its_local_workers(tmp_path):
    why = admission(tmp_path).why_not_runnable(real_job())
    assert why is not None and "this host has none" in why


def test_under_ray_no_verdict_until_the_actors_said_which_gpus_they_have(tmp_path):
    a = admission(tmp_path)
    a.worker_gpus = lambda: None  # no actor Ready yet
    assert a.why_not_runnable(real_job()) is None


def test_under_ray_the_actors_gpus_decide(tmp_path):
    a = admission(tmp_path)
    a.worker_gpus = lambda: [gpu(80)]
    assert a.why_not_runnable(real_job()) is None  # an 80 GiB card elsewhere runs it
    a.worker_gpus = lambda: [gpu(2)]
    why = a.why_not_runnable(real_job())
    assert why is not None and "MiB" in why
