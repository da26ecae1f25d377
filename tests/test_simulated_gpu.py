"""The GPU path on simulated cards (daemon.testing.SimulatedGpus / SimulatedGpuBackend): the real daemon,
scheduler, planner, admission and warm cache, with the memory model's real-size numbers for Wan2.2 on 24, 48,
80 and 141 GiB cards. The worker holds what NVML counts as used (its warm pipelines and its allocator's
reserve); it reports that, and the daemon adds it back before planning the worker's next job."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
from conftest import DaemonHarness, fast_settings, wait_for

from daemon.memory import (
    CUDA_CONTEXT_MB,
    GIB,
    JobDemand,
    device_weights_mb,
    optimizations,
    phase_peaks_mb,
    plan_for,
)
from daemon.models import T2V_A14B, TI2V_5B
from daemon.testing import SimulatedGpus, write_model_folder

BACKEND = "daemon.testing:SimulatedGpuBackend"
A14B = JobDemand(T2V_A14B, 1280, 720, 81)  # the registry defaults of each model
TI2V = JobDemand(TI2V_5B, 1280, 704, 121)


@pytest.fixture
def card(tmp_path):
    """card(GiB) -> a started daemon whose one worker runs on a simulated card of that size, with config-only
    model folders ``a14b`` (T2V-A14B) and ``ti2v`` (TI2V-5B) in its model root."""
    made: list[DaemonHarness] = []

    def make(gib: float, *, other_mb: int = 0) -> DaemonHarness:
        models = tmp_path / "models"
        gpus = SimulatedGpus(models, [int(gib * GIB)], other_mb=[other_mb])
        write_model_folder(tmp_path / "a14b", T2V_A14B)
        write_model_folder(tmp_path / "ti2v", TI2V_5B)
        h = DaemonHarness(tmp_path, fast_settings(tmp_path, models), BACKEND, gpus)
        h.gpus = gpus
        made.append(h)
        h.start()
        wait_for(h.daemon.workers_ready, 30, what="the worker")
        return h

    yield make
    for h in made:
        h.stop()
    wait_for(lambda: not multiprocessing.active_children(), 15, what="worker processes to exit")


def run_one(h: DaemonHarness, name: str, text: str) -> dict:
    h.drop(f"{name}.yaml", text)
    return h.sidecar(name, timeout=30)


def folder(h: DaemonHarness, name: str) -> str:
    return str((Path(h.root) / name).resolve())


def test_ten_ti2v_5b_jobs_on_a_24_gib_card_load_once_and_keep_one_mode(card):
    total = 24 * GIB
    first = plan_for(TI2V, total)
    assert first is not None and (first.mode, first.vae_tiling) == ("model", True)
    # Why this needs the worker's report: after one job the allocator keeps its peak reserved, and NVML's free
    # figure alone admits no mode at all for the next one.
    reserved = max(phase_peaks_mb(TI2V_5B, 1280, 704, 121, "model", vae_tiling=True).values())
    assert plan_for(TI2V, total - CUDA_CONTEXT_MB - int(reserved)) is None
    h = card(24)
    jobs = "".join(f"  - prompt: clip {n}\n" for n in range(10))
    h.drop("ten.yaml", "defaults: {model: ti2v, steps: 2}\njobs:\n" + jobs)
    sides = [h.sidecar(f"ten-{n}", timeout=30) for n in range(1, 11)]
    assert [s["model_used"]["cache"] for s in sides] == ["loaded"] + ["cached"] * 9
    assert {tuple(s["optimizations_applied"]) for s in sides} == {("offload:model", "vae_tiling")}
    assert all(s["attempts"] == 1 and s["model_used"]["evicted"] == [] for s in sides)


# (card GiB) -> per job of A14B, TI2V-5B, A14B: (optimizations, cache, evicted folder names), as the memory
# model's estimates and the worker's budget (90% of the card) imply.
QUEUES = {
    24: [(["offload:group"], "loaded", []), (["offload:model", "vae_tiling"], "loaded", ["a14b"]),
         (["offload:group"], "loaded", ["ti2v"])],
    48: [(["offload:model"], "loaded", []), (["vae_tiling"], "loaded", ["a14b"]),
         (["offload:model"], "loaded", ["ti2v"])],
    80: [(["vae_tiling"], "loaded", []), ([], "loaded", ["a14b"]), (["vae_tiling"], "loaded", ["ti2v"])],
    141: [([], "loaded", []), ([], "loaded", []), ([], "cached", [])],
}  # fmt: skip


@pytest.mark.parametrize("gib", sorted(QUEUES))
def test_a14b_then_ti2v_then_a14b_loads_and_evicts_as_the_budget_implies(card, gib):
    h = card(gib)
    sides = [
        run_one(h, name, f"model: {model}\nprompt: {name}\nsteps: 2\n")
        for name, model in (("first", "a14b"), ("second", "ti2v"), ("third", "a14b"))
    ]
    got = [(s["optimizations_applied"], s["model_used"]["cache"], s["model_used"]["evicted"]) for s in sides]
    want = [(opts, cache, [folder(h, n) for n in evicted]) for opts, cache, evicted in QUEUES[gib]]
    assert got == want
    # The empty card's plan for each job, every time: the worker's own holdings never weakened one.
    for side, demand in zip(sides, (A14B, TI2V, A14B), strict=True):
        plan = plan_for(demand, gib * GIB)
        assert plan is not None and side["optimizations_applied"] == optimizations(plan)
    assert all(s["attempts"] == 1 for s in sides)


def test_a_job_that_fits_the_empty_card_but_not_beside_the_warm_pipeline_evicts_it_and_runs(card):
    total = 48 * GIB
    big = JobDemand(T2V_A14B, 1280, 720, 129)
    ti2v = plan_for(TI2V, total)
    assert ti2v is not None and (ti2v.mode, ti2v.vae_tiling) == ("resident", True)
    warm = CUDA_CONTEXT_MB + max(phase_peaks_mb(TI2V_5B, 1280, 704, 121, "resident", vae_tiling=True).values())
    assert plan_for(big, total) is not None and plan_for(big, total - int(warm)) is None
    h = card(48)
    run_one(h, "small", "model: ti2v\nprompt: warm it\nsteps: 2\n")
    side = run_one(h, "big", "model: a14b\nprompt: needs the card\nsteps: 2\nframes: 129\n")
    assert side["model_used"]["cache"] == "loaded" and side["model_used"]["evicted"] == [folder(h, "ti2v")]
    assert side["attempts"] == 1


def test_memory_another_process_frees_is_used_by_the_next_plan(card):
    # Other processes' use is theirs (not added back): the job waits while it does not fit beside it.
    h = card(24, other_mb=20 * GIB)
    h.drop("later.yaml", "model: ti2v\nprompt: waits for room\nsteps: 2\n")
    wait_for(lambda: "later" in h.daemon.records, 30, what="the job to be queued")
    assert not (h.outbox / "later.json").exists() and not h.daemon.running
    h.gpus.set_other(0, 2 * GIB)
    side = h.sidecar("later", timeout=30)
    assert side["optimizations_applied"] == ["offload:model", "vae_tiling"]


def test_a_warm_pipeline_keeps_its_mode_when_a_faster_one_would_fit_now(card):
    # Loaded in sequential offload while another process held most of the card; once it is gone a faster mode
    # fits, but that mode is another cache entry: the next job reuses the warm pipeline instead of loading again.
    h = card(24, other_mb=10 * GIB)
    first = run_one(h, "squeezed", "model: ti2v\nprompt: squeezed\nsteps: 2\n")
    assert first["optimizations_applied"] == ["offload:sequential", "vae_tiling"]
    h.gpus.set_other(0, 0)
    assert plan_for(TI2V, 24 * GIB).mode == "model"  # what a cold worker would now get
    second = run_one(h, "roomy", "model: ti2v\nprompt: roomy\nsteps: 2\n")
    assert second["model_used"]["cache"] == "cached"
    assert second["optimizations_applied"][0] == "offload:sequential"  # VAE tiling is per job, not per pipeline


def test_a_long_job_evicts_a_warm_pipeline_the_cache_budget_would_keep(card):
    # 141 GiB: A14B (resident, 63 GiB of weights on the card) and TI2V-5B both fit the worker's budget, but a
    # 321-frame TI2V-5B job does not fit beside the A14B: without evicting it the job would run out of memory.
    total = 141 * GIB
    long = JobDemand(TI2V_5B, 1280, 704, 321)
    plan = plan_for(long, total)
    a14b_weights = device_weights_mb(T2V_A14B, "resident")
    assert plan is not None and plan.mode == "resident" and plan.estimate_mb + a14b_weights > total
    h = card(141)
    run_one(h, "a14b-first", "model: a14b\nprompt: warm\nsteps: 2\n")
    side = run_one(h, "long", "model: ti2v\nprompt: long\nsteps: 2\nframes: 321\n")
    assert side["attempts"] == 1 and side["model_used"]["evicted"] == [folder(h, "a14b")]
