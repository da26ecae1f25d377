"""The memory model and the offload planner (daemon/memory.py): pure tables, no GPU."""

from __future__ import annotations

import itertools
import json

import pytest
from factories import make_record

from daemon.memory import (
    CUDA_CONTEXT_MB,
    GB,
    MODES,
    SAFETY_MARGIN,
    JobDemand,
    PeakBook,
    Plan,
    WarmMode,
    book_key,
    device_weights_mb,
    estimate_mb,
    latent_tokens,
    optimizations,
    phase_peaks_mb,
    plan_for,
    strongest_estimate_mb,
    weights_mb,
)
from daemon.models import I2V_A14B, T2V_A14B, T2V_SINGLE, TI2V_5B

GIB = 1024
TI2V = (TI2V_5B, 1280, 704, 121)
A14B = (T2V_A14B, 1280, 720, 81)


def test_latent_tokens_follow_the_vae_stride_and_patch_size():
    assert latent_tokens(TI2V_5B, 1280, 704, 121) == 31 * 22 * 40 == 27_280
    assert latent_tokens(T2V_A14B, 1280, 720, 81) == 21 * 45 * 80 == 75_600
    assert latent_tokens(T2V_SINGLE, 832, 480, 81) == 21 * 30 * 52


def test_the_measured_ti2v_5b_phases_are_reproduced():
    """[M1] TI2V-5B 1280x704x121: transformer step 14.4 GiB resident, fp32 VAE decode 23.8 GiB (H200)."""
    model = phase_peaks_mb(*TI2V, "model")  # one component at a time: the phases as measured alone
    assert model["denoise"] == pytest.approx(14.4 * GIB, rel=0.25)
    assert model["decode"] == pytest.approx(23.8 * GIB, rel=0.05)


def test_ti2v_5b_resident_holds_every_component_plus_the_biggest_phase():
    # pipe.to("cuda") keeps the transformer (10 GB) and UMT5 (11 GB) on the GPU while the VAE decodes:
    # the estimate is weights + the 23.8 GiB decode, about 48 GiB, not transformer + decode.
    est = estimate_mb(*TI2V, "resident")
    assert est >= (23.8 + 9.3 + 10.2) * GIB
    assert est <= 55 * GIB
    # Model offload, one component at a time: the decode (23.8 GiB) sets the peak -> 24-30 GiB.
    assert 23.8 * GIB <= estimate_mb(*TI2V, "model") <= 30 * GIB


def test_a14b_expert_forward_matches_its_measurement():
    """[M1] one A14B expert forward at 1280x720x81: 34.8 GiB."""
    assert phase_peaks_mb(*A14B, "model")["denoise"] == pytest.approx(34.8 * GIB, rel=0.05)
    # [P1] the published single-GPU-with-offload figure (59.8 GB, original code) is an upper bound.
    assert estimate_mb(*A14B, "model") < 59.8e9 / (1 << 20)


@pytest.mark.parametrize("arch,w,h,f", [TI2V, A14B, (I2V_A14B, 1280, 720, 81), (T2V_SINGLE, 832, 480, 81)])
def test_stronger_modes_and_tiling_never_cost_more(arch, w, h, f):
    ests = {(m, t): estimate_mb(arch, w, h, f, m, vae_tiling=t) for m in MODES for t in (False, True)}
    for m in MODES:
        assert ests[(m, True)] <= ests[(m, False)]
    for a, b in itertools.pairwise(MODES):
        assert ests[(b, False)] <= ests[(a, False)] and ests[(b, True)] <= ests[(a, True)]
    assert ests[("sequential", False)] < 0.6 * ests[("resident", False)]  # much smaller
    assert estimate_mb(arch, w, h, f, "resident", fp8=True) < ests[("resident", False)]


def test_tiling_lowers_the_ti2v_5b_estimate_in_every_mode():
    for m in MODES:
        assert estimate_mb(*TI2V, m, vae_tiling=True) < estimate_mb(*TI2V, m)


def test_estimate_is_the_largest_phase_plus_context_with_the_margin_rounded_up():
    peaks = phase_peaks_mb(*A14B, "group")
    assert estimate_mb(*A14B, "group") == -(-(max(peaks.values()) + CUDA_CONTEXT_MB) * (1 + SAFETY_MARGIN) // 1)
    assert isinstance(estimate_mb(*A14B, "group"), int)


def test_dtype_fp32_costs_more_and_bad_inputs_are_refused():
    assert estimate_mb(*TI2V, "model", dtype="fp32") > estimate_mb(*TI2V, "model", dtype="bf16")
    assert estimate_mb(*TI2V, "none") == estimate_mb(*TI2V, "resident")  # policy.py's name for resident
    with pytest.raises(ValueError, match="architecture"):
        estimate_mb("sdxl", 64, 64, 9, "resident")
    with pytest.raises(ValueError, match="offload mode"):
        estimate_mb(*TI2V, "cpu")
    with pytest.raises(ValueError, match="dtype"):
        estimate_mb(*TI2V, "resident", dtype="int4")


def test_tiny_models_need_little_more_than_a_cuda_context():
    est = estimate_mb(TI2V_5B, 64, 64, 9, "resident", tiny=True)
    assert CUDA_CONTEXT_MB < est < 1024


TI2V_JOB = JobDemand(*TI2V)
A14B_JOB = JobDemand(*A14B)
T21_JOB = JobDemand(T2V_SINGLE, 832, 480, 81)
TINY_JOB = JobDemand(TI2V_5B, 64, 64, 9, tiny=True)


@pytest.mark.parametrize(
    "job,free_gib,expected",
    [
        # TI2V-5B 720p: resident on an 80 GiB card, tiling at 40, model offload + tiling on a 24 GiB card.
        (TI2V_JOB, 80, ("resident", False)),
        (TI2V_JOB, 40, ("resident", True)),
        (TI2V_JOB, 24, ("model", True)),
        (TI2V_JOB, 16, ("group", True)),
        (TI2V_JOB, 13, ("sequential", True)),
        (TI2V_JOB, 2, None),
        # A14B 720p: both experts + UMT5 resident need ~86 GiB (H200 yes; 80 GiB only with tiling, and not
        # the ~78.1 GiB an H100 80GB really has free), one expert at a time ~39 GiB, a 24 GiB card needs
        # group offload, 12 GiB sequential + tiling, 8 GiB is not enough.
        (A14B_JOB, 139, ("resident", False)),
        (A14B_JOB, 80, ("resident", True)),
        (A14B_JOB, 78.1, ("model", False)),
        (A14B_JOB, 24, ("group", False)),
        (A14B_JOB, 16, ("group", True)),
        (A14B_JOB, 12, ("sequential", True)),
        (A14B_JOB, 8, None),
        # Wan2.1 1.3B at 832x480x81: resident on 24 GiB, about 8 GiB with group offload.
        (T21_JOB, 24, ("resident", False)),
        (T21_JOB, 10, ("group", False)),
        (TINY_JOB, 2, ("resident", False)),
    ],
)
def test_plan_for_picks_the_fastest_mode_that_fits(job, free_gib, expected):
    plan = plan_for(job, int(free_gib * GIB))
    if expected is None:
        assert plan is None
    else:
        assert (plan.mode, plan.vae_tiling, plan.fp8) == (*expected, False)
        assert plan.estimate_mb <= free_gib * GIB
        assert plan.estimate_mb == estimate_mb(
            job.architecture, job.width, job.height, job.frames, plan.mode, vae_tiling=plan.vae_tiling, tiny=job.tiny
        )


@pytest.mark.parametrize(
    "override,free_gib,expected",
    [
        ("group", 80, ("group", False, False)),  # forced even where resident would fit
        ("model", 80, ("model", False, False)),
        ("sequential", 80, ("sequential", False, False)),
        ("none", 80, ("resident", False, False)),
        ("resident", 40, ("resident", True, False)),
        ("none", 24, None),  # resident only: does not fit, even though model offload would
        ("sequential", 2, None),
    ],
)
def test_the_offload_override_is_honoured(override, free_gib, expected):
    plan = plan_for(TI2V_JOB, free_gib * GIB, override=override)
    assert (None if plan is None else (plan.mode, plan.vae_tiling, plan.fp8)) == expected


def test_fp8_is_a_last_resort_and_only_when_lossy_is_allowed():
    # A14B on an H100 (~78 GiB free) with resident forced: only fp8 weights make it fit.
    assert plan_for(A14B_JOB, int(78.1 * GIB), override="none") is None
    plan = plan_for(A14B_JOB, int(78.1 * GIB), override="none", allow_lossy=True)
    assert (plan.mode, plan.vae_tiling, plan.fp8) == ("resident", False, True)
    # Lossless modes are always tried first.
    assert not plan_for(A14B_JOB, 24 * GIB, allow_lossy=True).fp8
    with pytest.raises(ValueError):
        plan_for(A14B_JOB, 24 * GIB, override="turbo")


def test_strongest_estimate_is_the_smallest_candidate():
    assert strongest_estimate_mb(A14B_JOB) == estimate_mb(*A14B, "sequential", vae_tiling=True)
    assert strongest_estimate_mb(A14B_JOB, allow_lossy=True) <= strongest_estimate_mb(A14B_JOB)


@pytest.mark.parametrize(
    "plan,names",
    [
        (Plan("resident", False, False, 1), []),
        (Plan("resident", True, False, 1), ["vae_tiling"]),
        (Plan("group", True, True, 1), ["offload:group", "vae_tiling", "fp8_weights"]),
        (Plan("sequential", False, False, 1), ["offload:sequential"]),
    ],
)
def test_optimizations_use_the_names_pipelines_reports(plan, names):
    assert optimizations(plan) == names
    assert plan.offload == ("none" if plan.mode == "resident" else plan.mode)


# ---- PeakBook ---------------------------------------------------------------------------------------


def test_book_keys():
    assert book_key(TI2V_5B, "model", "bf16", True) == "wan2.2-ti2v-5b|model|bf16|tiled"
    assert book_key(TI2V_5B, "none") == "wan2.2-ti2v-5b|resident|bf16|full"
    assert book_key(TI2V_5B, "resident", tiny=True) == "tiny:wan2.2-ti2v-5b|resident|bf16|full"


def test_estimates_move_toward_measured_peaks_and_persist(tmp_path):
    path = tmp_path / "state" / "peaks.json"
    book = PeakBook(path)
    key = book_key(TI2V_5B, "model", "bf16", True)
    first = estimate_mb(*TI2V, "model", vae_tiling=True, book=book)
    assert first == estimate_mb(*TI2V, "model", vae_tiling=True)  # nothing learned: correction 1.0
    raw = first / (1 + SAFETY_MARGIN)
    measured = 0.7 * raw  # the model over-estimates this configuration by ~43%
    history = [first]
    for _ in range(5):
        est = estimate_mb(*TI2V, "model", vae_tiling=True, book=book)
        book.record(key, est, measured)
        history.append(estimate_mb(*TI2V, "model", vae_tiling=True, book=book))
    # Monotone toward the target (measured + margin), within 5% after five runs, never below it.
    target = measured * (1 + SAFETY_MARGIN)
    assert all(a > b for a, b in itertools.pairwise(history))
    assert history[-1] == pytest.approx(target, rel=0.05) and history[-1] >= target
    assert book.correction(key) == pytest.approx(0.7, abs=0.02)
    # Other keys are untouched; a fresh instance reads the same corrections from disk.
    assert estimate_mb(*TI2V, "model", book=book) == estimate_mb(*TI2V, "model")
    again = PeakBook(path)
    assert again.correction(key) == book.correction(key)
    assert estimate_mb(*TI2V, "model", vae_tiling=True, book=again) == history[-1]
    data = json.loads(path.read_text())
    assert data["entries"][key]["samples"] == 5


def test_one_outlier_moves_half_way_and_corrections_are_clamped(tmp_path):
    book = PeakBook(tmp_path / "p.json")
    key = book_key(T2V_A14B, "group")
    est = estimate_mb(*A14B, "group")
    raw = est / (1 + SAFETY_MARGIN)
    assert book.record(key, est, 2 * raw) == pytest.approx(1.5)
    other = book_key(T2V_A14B, "model")
    assert book.record(other, est, 100 * raw) == pytest.approx(2.0)  # the sample is clamped to 3 first
    for _ in range(12):
        book.record(key, estimate_mb(*A14B, "group", book=book), 100 * raw)
    assert 2.99 < book.correction(key) <= PeakBook.HIGH
    for _ in range(12):
        book.record(key, estimate_mb(*A14B, "group", book=book), raw / 100)
    assert PeakBook.LOW <= book.correction(key) < 0.51
    # An estimate made without the book can still be recorded truthfully.
    fresh = PeakBook(tmp_path / "q.json")
    fresh.record(key, est, raw, correction_used=1.0)
    assert fresh.correction(key) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        fresh.record(key, 0, 10)


def test_an_unreadable_book_starts_afresh(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("{not json")
    book = PeakBook(path)
    assert book.correction("anything") == 1.0
    book.record(book_key(TI2V_5B, "model"), 1000, 500)
    assert PeakBook(path).correction(book_key(TI2V_5B, "model")) < 1.0
    assert PeakBook(None).correction("x") == 1.0  # in-memory book


def test_job_demand_from_a_record():
    rec = make_record("r", model="tiny-ti2v-5b", params={"width": 64, "height": 64, "frames": 9})
    assert JobDemand.from_record(rec) == JobDemand(TI2V_5B, 64, 64, 9, tiny=True)


# ---- the warm pipeline's mode first -------------------------------------------------------------------------

TI2V_720P = JobDemand("wan2.2-ti2v-5b", 1280, 704, 121)


def test_the_warm_mode_is_planned_first_when_it_fits():
    # 24 GiB: a cold worker gets model offload with tiling; a worker holding the model in sequential offload
    # keeps that mode (another mode is another cache entry: the model would be loaded a second time).
    assert plan_for(TI2V_720P, 24 * GIB).mode == "model"
    warm = plan_for(TI2V_720P, 24 * GIB, warm=WarmMode("sequential"))
    assert warm is not None and warm.mode == "sequential" and not warm.fp8


def test_a_warm_mode_that_does_not_fit_gives_way_to_the_usual_order():
    resident = plan_for(TI2V_720P, 24 * GIB, warm=WarmMode("resident"))
    assert resident == plan_for(TI2V_720P, 24 * GIB)


def test_a_warm_mode_outside_the_override_or_lossy_setting_is_not_tried():
    assert plan_for(TI2V_720P, 24 * GIB, override="group", warm=WarmMode("sequential")).mode == "group"
    assert not plan_for(TI2V_720P, 24 * GIB, warm=WarmMode("model", fp8=True)).fp8


def test_warm_pipelines_hold_their_weights_on_the_device_only_when_resident():
    weights = weights_mb("wan2.2-t2v-a14b")
    assert round(weights / GB) == 2 * 28 + 11 + 1  # two experts, UMT5-XXL, the Wan2.1 VAE (0.5 GB)
    assert device_weights_mb("wan2.2-t2v-a14b", "none") == weights
    assert [device_weights_mb("wan2.2-t2v-a14b", m) for m in ("model", "group", "sequential")] == [0, 0, 0]
