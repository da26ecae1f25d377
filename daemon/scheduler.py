"""Which queued job runs next, and where. Pure: no torch, no I/O; the daemon hands it records and the time.

One worker (:func:`pick_next`): highest priority first, FIFO (intake order) within a priority; a job
waiting out a retry backoff (``not_before`` in the future) is skipped until its time comes.

Several workers (:func:`assign` on a list, :func:`assign_from` on a :class:`ReadyQueue`), each a :class:`Slot`
(a GPU with its free memory, or a CPU):

1. Ready jobs (``not_before <= now``) are ranked by :func:`effective_priority` (descending), then intake
   order. Aging makes a waiting job climb linearly so that it reaches the top priority present within
   ``aging_bound_seconds``: a low-priority job waits at most about the aging bound (plus the running
   jobs' remaining time, and the jobs older than it that aged to the top as well).
2. Within one priority bucket (the integer part of the effective priority), jobs whose model is already
   warm on a free slot go first and go to that slot (model affinity): a mixed queue does not reload
   models back and forth. A higher bucket always beats affinity.
3. Admission: a job goes to a GPU slot only if ``plan(demand, free_mb)`` finds a mode that fits (on a slot
   where its model is warm, the warm pipeline's mode is tried first: another mode would load it again); the
   GPU's free memory then drops by the plan's estimate for the rest of the call (slots on the same GPU
   share it). CPU slots (``free_mb is None``) take any job. Each slot gets at most one job per call.
   Among the slots that admit a job: a warm one, then a GPU over a CPU, then the fastest plan, then the
   tightest fit (big GPUs stay free for big jobs).
4. Reservation (only when slots carry ``total_mb``): a job that has waited the whole aging bound and
   fits no free slot now, but would fit one of those GPUs empty, reserves those GPUs: lower-ranked jobs
   are not started there, so it is not starved by a stream of smaller jobs.

A job that fits no GPU even when empty (:func:`fits_nowhere`) stays queued in :func:`assign`; the daemon
fails it with ``insufficient_vram`` and :func:`insufficient_vram_message`.

Window: :func:`assign_from` applies these rules to a bounded set of candidates: the first ``window`` (256)
ready jobs in rank order, plus the first ready jobs of each model warm on a free slot (one per such slot), so
that affinity still finds a warm job deeper in the queue; with at most ``window`` ready jobs it decides as
:func:`assign`. A deeper job waits for a later decision (each job end and tick makes one). The rules would
start it now only if the ``window`` jobs above it could not use the few free slots (they wait for memory;
each fits an empty GPU, or the daemon failed it), so what is lost is backfilling far behind them; it moves
up as they start, and once it has waited the aging bound no newer job ranks above it.

Cost: :func:`assign` ranks the whole list, O(n log n) for n queued, then places with one ``plan`` call per
(job, slot) tried (S slots, a small constant). A :class:`ReadyQueue` keeps the order instead (O(log n) per
add or discard); :func:`assign_from` reads its window in O(m + W log m) (m: (priority, model) pairs
present; W: the window) and places in O(W * S), whatever n.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from daemon.jobs import JobRecord, JobState
from daemon.memory import MODES, JobDemand, Plan, WarmMode
from daemon.ranking import (  # noqa: F401  (re-exported: the scheduler's vocabulary)
    PRIORITY_MAX,
    PRIORITY_MIN,
    PRIORITY_SPAN,
    WINDOW,
    Ranked,
    ReadyQueue,
    _aging_on,
    _rank_pairs,
    effective_priority,
    rank,
    waited,
)


def order_key(record: JobRecord) -> tuple[int, int]:
    return (-record.priority, record.seq)


def pick_next(queued: Iterable[JobRecord], now: float) -> JobRecord | None:
    ready = [r for r in queued if r.state is JobState.QUEUED and r.not_before <= now]
    return min(ready, key=order_key, default=None)


# ---- assignment ---------------------------------------------------------------------------------------


@dataclass
class Slot:
    """A worker that is free to take a job now."""

    worker: str
    gpu_index: int | None
    free_mb: int | None  # None: a CPU worker (no admission check)
    warm_models: frozenset[str] = frozenset()  # model names (record.model.name) loaded in the worker
    total_mb: int | None = None  # the GPU's size; enables reservation for aged jobs (see module doc)
    # How each warm model is held (the worker's report): its plan is tried first, so it is not loaded again.
    warm_modes: Mapping[str, WarmMode] = field(default_factory=dict)


#: ``plan(demand, free_mb)`` -> a Plan that fits, or None (e.g. ``functools.partial(memory.plan_for, ...)``);
#: on a slot where the job's model is warm it is asked ``plan(demand, free_mb, warm=WarmMode)``, which tries
#: that mode first (:func:`daemon.memory.plan_for`).
Planner = Callable[..., Plan | None]


def _plan_on(plan: Planner, d: JobDemand, free_mb: int, warm: WarmMode | None) -> Plan | None:
    # Asked without the keyword when nothing is warm: a planner may know nothing of warm modes.
    return plan(d, free_mb) if warm is None else plan(d, free_mb, warm=warm)


class Assignment(NamedTuple):
    record: JobRecord
    slot: Slot
    plan: Plan | None  # None on a CPU slot, or when the job's demand is unknown


def _model_name(record: JobRecord) -> str | None:
    return record.model.name


def _plan_rank(plan: Plan | None) -> tuple[int, int, int]:
    if plan is None:
        return (0, 0, 0)
    return (int(plan.fp8), MODES.index(plan.mode) if plan.mode in MODES else len(MODES), int(plan.vae_tiling))


def _decide(
    ranked: Ranked,
    slots: list[Slot],
    now: float,
    aging_bound_seconds: float | None,
    demand: Callable[[JobRecord], JobDemand | None],
    plan: Planner,
) -> list[Assignment]:
    """The rules of the module doc applied to ``ranked``: (record, effective priority) pairs, best first."""
    if not ranked or not slots:
        return []

    def gpu_key(slot: Slot) -> object:
        return ("gpu", slot.gpu_index) if slot.gpu_index is not None else ("worker", slot.worker)

    gpu_free: dict[object, int] = {}
    for s in slots:
        if s.free_mb is not None:
            k = gpu_key(s)
            gpu_free[k] = min(gpu_free.get(k, s.free_mb), s.free_mb)
    free_slots = list(slots)
    reserved: set[object] = set()
    demands: dict[int, JobDemand | None] = {}
    out: list[Assignment] = []

    def demand_of(r: JobRecord) -> JobDemand | None:
        return demands[id(r)] if id(r) in demands else demands.setdefault(id(r), demand(r))

    def options(r: JobRecord, warm_only: bool) -> list[tuple[tuple, int, Slot, Plan | None]]:
        name = _model_name(r)
        found: list[tuple[tuple, int, Slot, Plan | None]] = []
        for n, s in enumerate(free_slots):
            warm = name is not None and name in s.warm_models
            if warm_only and not warm:
                continue
            if s.free_mb is None:
                found.append(((not warm, 1, (0, 0, 0), 0, n), n, s, None))
                continue
            if gpu_key(s) in reserved:
                continue
            d = demand_of(r)  # asked only when a GPU slot is tried: the affinity pass skips cold jobs cheaply
            held = s.warm_modes.get(name) if warm and name is not None else None
            p = _plan_on(plan, d, gpu_free[gpu_key(s)], held) if d is not None else None
            if d is not None and p is None:
                continue
            found.append(((not warm, 0, _plan_rank(p), gpu_free[gpu_key(s)], n), n, s, p))
        return found

    def place(r: JobRecord, warm_only: bool) -> bool:
        found = options(r, warm_only)
        if not found:
            return False
        _, n, s, p = min(found, key=lambda o: o[0])
        out.append(Assignment(r, s, p))
        del free_slots[n]
        if s.free_mb is not None and p is not None:
            gpu_free[gpu_key(s)] -= p.estimate_mb
        return True

    def reserve(r: JobRecord) -> None:
        """An aged job that fits nothing free now keeps the GPUs it could use empty from lower jobs."""
        if not _aging_on(aging_bound_seconds) or waited(r, now) < aging_bound_seconds:
            return
        d = demand_of(r)
        if d is None:
            return
        for s in slots:
            if s.free_mb is not None and s.total_mb is not None and plan(d, s.total_mb) is not None:
                reserved.add(gpu_key(s))

    i = 0
    while i < len(ranked) and free_slots:
        bucket = math.floor(ranked[i][1])
        j = i
        while j < len(ranked) and math.floor(ranked[j][1]) == bucket:
            j += 1
        # Model affinity first: within the bucket, jobs whose model is warm on a free slot that admits them.
        left = [r for r, _ in ranked[i:j] if not (free_slots and place(r, warm_only=True))]
        for r in left:
            if not free_slots:
                break
            if not place(r, warm_only=False):
                reserve(r)
        i = j
    return out


def assign(
    queued: list[JobRecord],
    slots: list[Slot],
    now: float,
    *,
    aging_bound_seconds: float | None,
    demand: Callable[[JobRecord], JobDemand | None],
    plan: Planner,
) -> list[Assignment]:
    """Jobs to start now, each on its own slot, in assignment order (see the module doc for the rules).

    ``demand(record)`` -> the job's :class:`daemon.memory.JobDemand`, or None when unknown (then any slot
    takes it, without a plan; the out-of-memory ladder is the safety net). ``plan(demand, free_mb)`` ->
    a :class:`daemon.memory.Plan` that fits, or None (e.g. ``functools.partial(memory.plan_for, ...)``).
    Both must be pure. Ranks the whole list: O(n log n); :func:`assign_from` is the bounded form.
    """
    ranked = _rank_pairs(queued, now, aging_bound_seconds) if slots else []
    return _decide(ranked, slots, now, aging_bound_seconds, demand, plan)


def assign_from(
    queue: ReadyQueue,
    slots: list[Slot],
    now: float,
    *,
    aging_bound_seconds: float | None,
    demand: Callable[[JobRecord], JobDemand | None],
    plan: Planner,
    window: int = WINDOW,
) -> list[Assignment]:
    """:func:`assign`'s rules applied to the window of ``queue`` (module doc, "Window"): the first ``window``
    ranked ready jobs, plus the first ready jobs of each model warm on a free slot (as many as the free slots
    where it is warm). Equal to ``assign(all queued, ...)`` whenever the ready jobs fit in the window."""
    warm = Counter(m for s in slots for m in s.warm_models)
    ranked = queue.window(now, aging_bound_seconds, window, warm) if slots else []
    return _decide(ranked, slots, now, aging_bound_seconds, demand, plan)


# ---- jobs no GPU can hold -------------------------------------------------------------------------


def fits_nowhere(demand: JobDemand, gpu_totals_mb: list[int], plan: Callable[[JobDemand, int], Plan | None]) -> bool:
    """True when the job fits no GPU of the inventory even empty, in any mode ``plan`` allows.

    An empty inventory gives False: with no GPU, admission is not this function's business (a CPU host is
    governed by ``worker.allow_cpu_for_real_models``).
    """
    return bool(gpu_totals_mb) and all(plan(demand, total) is None for total in gpu_totals_mb)


def insufficient_vram_message(demand: JobDemand, gpu_totals_mb: list[int], best_estimate_mb: int) -> str:
    """The failure text for a job :func:`fits_nowhere`, with the numbers (``best_estimate_mb``: the
    smallest estimate over the allowed modes, e.g. :func:`daemon.memory.strongest_estimate_mb`)."""
    largest = max(gpu_totals_mb, default=0)
    sizes = ", ".join(f"{t} MiB" for t in gpu_totals_mb) or "none"
    return (
        f"{demand.architecture} at {demand.width}x{demand.height}, {demand.frames} frames needs about "
        f"{best_estimate_mb} MiB ({best_estimate_mb / 1024:.1f} GiB) of GPU memory even with the strongest "
        f"allowed offload and VAE tiling, but the largest GPU has {largest} MiB ({largest / 1024:.1f} GiB) "
        f"(GPUs: {sizes}); lower the resolution or the frame count, or allow lossy fp8 weights"
    )
