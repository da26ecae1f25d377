"""Scheduling decisions for several workers (daemon/scheduler.py): tables with an injected ``now``."""

from __future__ import annotations

import math
from collections import Counter
from functools import partial

import pytest
from factories import make_record
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.jobs import JobRecord, JobState
from daemon.memory import JobDemand, Plan, plan_for, strongest_estimate_mb
from daemon.models import T2V_A14B, TI2V_5B
from daemon.scheduler import (
    PRIORITY_SPAN,
    WINDOW,
    ReadyQueue,
    Slot,
    assign,
    assign_from,
    effective_priority,
    fits_nowhere,
    insufficient_vram_message,
    pick_next,
    rank,
)

HOUR = 3600.0
GIB = 1024


def rec(
    job_id,
    seq,
    *,
    priority=0,
    queued_at=0.0,
    not_before=0.0,
    model="m",
    need=1000,
    state=JobState.QUEUED,
    params=None,
    architecture=None,
    **kw,
) -> JobRecord:
    """A queued job; ``need`` is its memory need (MiB) for the fake planner below (carried as its width; None:
    a job whose demand is unknown)."""
    params = params or {"width": need if need is not None else 0}
    return make_record(
        job_id,
        seq=seq,
        priority=priority,
        params=params,
        model=model,
        architecture=architecture,
        received_at=queued_at,
        queued_at=queued_at,
        not_before=not_before,
        state=state,
        **kw,
    )


def demand(r: JobRecord) -> JobDemand | None:
    need = r.params.width
    return None if not need else JobDemand("fake", need, 1, 1)


def plan(d: JobDemand, free_mb: int) -> Plan | None:
    """Fake planner: resident needs ``need`` MiB; group offload half of it."""
    if d.width <= free_mb:
        return Plan("resident", False, False, d.width)
    if d.width // 2 <= free_mb:
        return Plan("group", False, False, d.width // 2)
    return None


def gpu(worker, free, *, index=None, warm=(), total=None) -> Slot:
    return Slot(worker, index if index is not None else int(worker[-1]), free, frozenset(warm), total)


def cpu(worker="cpu", warm=()) -> Slot:
    return Slot(worker, None, None, frozenset(warm))


def run(queue, slots, now=0.0, bound=HOUR, **kw):
    out = assign(
        queue, slots, now, aging_bound_seconds=bound, demand=kw.get("demand", demand), plan=kw.get("plan", plan)
    )
    return [(a.record.id, a.slot.worker, a.plan.mode if a.plan else None) for a in out]


def ids(queue, slots, now=0.0, bound=HOUR):
    return [job for job, _, _ in run(queue, slots, now, bound)]


# ---- order: priority, FIFO, aging, backoff ------------------------------------------------------


@pytest.mark.parametrize(
    "queue,expected",
    [
        # highest priority first
        ([rec("low", 1, priority=0), rec("high", 2, priority=5)], ["high", "low"]),
        # FIFO (intake order) within a priority, whatever the list order
        ([rec("b", 2), rec("a", 1), rec("c", 3)], ["a", "b", "c"]),
        ([rec("n1", 1, priority=-3), rec("p", 3, priority=1), rec("z", 2)], ["p", "z", "n1"]),
        # not the queued ones are skipped
        ([rec("done", 1, state=JobState.DONE), rec("run", 2, state=JobState.RUNNING), rec("q", 3)], ["q"]),
        ([], []),
    ],
)
def test_priority_then_fifo(queue, expected):
    slots = [cpu(f"w{i}") for i in range(4)]
    assert ids(queue, slots, now=1.0, bound=None) == expected
    assert ids(queue, slots, now=1.0, bound=HOUR) == expected  # everything queued at once: no aging effect


@pytest.mark.parametrize(
    "now,expected_first",
    [
        (0.0, "fresh-high"),
        (0.5 * HOUR, "fresh-high"),
        (HOUR - 1, "fresh-high"),
        (HOUR + 1, "old-low"),  # after the aging bound the old priority -5 job beats a fresh priority 5 job
        (10 * HOUR, "old-low"),
    ],
)
def test_aging_bound(now, expected_first):
    queue = [rec("old-low", 1, priority=-5, queued_at=0.0), rec("fresh-high", 2, priority=5, queued_at=now)]
    assert ids(queue, [cpu()], now=now) == [expected_first]
    # Aging off: plain priority forever.
    assert ids(queue, [cpu()], now=now, bound=None) == ["fresh-high"]
    assert ids(queue, [cpu()], now=now, bound=0) == ["fresh-high"]


def test_aging_span_covers_the_priorities_waiting_not_the_whole_range():
    # With priorities 0 and 10 waiting, a priority 0 job needs the whole bound, not bound/200, to catch up.
    for now, first in ((0.1 * HOUR, "ten"), (0.9 * HOUR, "ten"), (1.1 * HOUR, "zero")):
        queue = [rec("zero", 1, priority=0, queued_at=0.0), rec("ten", 2, priority=10, queued_at=now)]
        assert ids(queue, [cpu()], now=now) == [first]
    # A job that came in shortly after ages as well and may still go first: the bound is about jobs that
    # arrive later than the bound, plus the (finite) ones that arrived within it.
    queue = [rec("zero", 1, priority=0, queued_at=0.0), rec("ten", 2, priority=10, queued_at=0.05 * HOUR)]
    assert ids(queue, [cpu()], now=5 * HOUR) == ["ten"]


@pytest.mark.parametrize(
    "priority,waited,span,expected",
    [
        (0, 0.0, None, 0.0),
        (0, HOUR, None, PRIORITY_SPAN),  # default span: the whole range -1000..1000
        (-1000, HOUR, None, 1000.0),  # the lowest priority reaches the top within the bound
        (-5, HOUR, 10, 5.0),
        (-5, 0.5 * HOUR, 10, 0.0),
        (3, 2 * HOUR, 10, 23.0),  # keeps rising after the bound: older aged jobs stay ahead
    ],
)
def test_effective_priority_formula(priority, waited, span, expected):
    r = rec("x", 1, priority=priority, queued_at=100.0)
    assert effective_priority(r, 100.0 + waited, HOUR, span=span) == pytest.approx(expected)
    assert effective_priority(r, 100.0 + waited, None) == priority
    unqueued = rec("y", 2, priority=priority).model_copy(update={"queued_at": None, "received_at": 100.0})
    assert effective_priority(unqueued, 100.0 + waited, HOUR, span=span) == pytest.approx(expected)


@pytest.mark.parametrize(
    "now,expected",
    [
        (5.0, ["ready"]),  # the high-priority job is still in its retry backoff
        (10.0, ["backoff", "ready"]),  # its time has come
    ],
)
def test_not_before(now, expected):
    queue = [rec("backoff", 1, priority=9, not_before=10.0), rec("ready", 2)]
    assert ids(queue, [cpu("a"), cpu("b")], now=now) == expected
    assert pick_next(queue, 5.0).id == "ready"  # one-worker API unchanged


# ---- model affinity -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "queue,slots,expected",
    [
        # Same priority: the job whose model is warm on the free slot goes first (no reload).
        ([rec("a", 1, model="m1"), rec("b", 2, model="m2")], [gpu("g0", 80000, warm={"m2"})], [("b", "g0")]),
        # Two slots: each job to the slot where its model is warm, even against FIFO order.
        (
            [rec("a", 1, model="m1"), rec("b", 2, model="m2")],
            [gpu("g0", 80000, warm={"m2"}), gpu("g1", 80000, warm={"m1"})],
            [("a", "g1"), ("b", "g0")],
        ),
        (
            [rec("a", 1, model="m1"), rec("b", 2, model="m2")],
            [gpu("g0", 80000), gpu("g1", 80000, warm={"m2"})],
            [("b", "g1"), ("a", "g0")],
        ),
        # A higher effective priority beats affinity.
        (
            [rec("a", 1, model="m1", priority=1), rec("b", 2, model="m2")],
            [gpu("g0", 80000, warm={"m2"})],
            [("a", "g0")],
        ),
        # Warm but too big for that slot: no affinity there.
        (
            [rec("a", 1, model="m1"), rec("b", 2, model="m2", need=100000)],
            [gpu("g0", 40000, warm={"m2"})],
            [("a", "g0")],
        ),
        # A mixed queue: m1 stays on g0, m2 on g1 (no thrashing), FIFO within each.
        (
            [rec("a1", 1, model="m1"), rec("b1", 2, model="m2"), rec("a2", 3, model="m1"), rec("b2", 4, model="m2")],
            [gpu("g0", 80000, warm={"m1"}), gpu("g1", 80000, warm={"m2"})],
            [("a1", "g0"), ("b1", "g1")],
        ),
    ],
)
def test_model_affinity(queue, slots, expected):
    assert [(j, w) for j, w, _ in run(queue, slots)] == expected


# ---- admission --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "queue,slots,expected",
    [
        # Too big for A's free memory, fits B.
        ([rec("big", 1, need=30000)], [gpu("a0", 20000), gpu("b1", 40000)], [("big", "b1", "resident")]),
        # Fits nowhere now (not even with the planner's group offload): stays queued.
        ([rec("huge", 1, need=100000)], [gpu("a0", 20000), gpu("b1", 40000)], []),
        # ... and does not block the jobs behind it.
        (
            [rec("huge", 1, need=100000, priority=5), rec("small", 2, need=1000)],
            [gpu("a0", 20000)],
            [("small", "a0", "resident")],
        ),
        # The fastest plan wins over a tighter fit: resident on B rather than group offload on A.
        ([rec("j", 1, need=30000)], [gpu("a0", 20000), gpu("b1", 40000)], [("j", "b1", "resident")]),
        ([rec("j", 1, need=30000)], [gpu("a0", 16000)], [("j", "a0", "group")]),
        # Same plan: the tightest fit, keeping the big GPU for the big job behind it.
        (
            [rec("small", 1, need=10000, priority=5), rec("big", 2, need=60000)],
            [gpu("big1", 80000), gpu("sm0", 20000)],
            [("small", "sm0", "resident"), ("big", "big1", "resident")],
        ),
        # Two slots, two different jobs, each slot at most one job per call.
        (
            [rec("a", 1), rec("b", 2), rec("c", 3)],
            [gpu("g0", 80000), gpu("g1", 80000)],
            [("a", "g0", "resident"), ("b", "g1", "resident")],
        ),
        # Two workers on one GPU share its free memory: the second big job does not fit what is left.
        (
            [rec("a", 1, need=20000), rec("b", 2, need=25000), rec("c", 3, need=5000)],
            [gpu("w0", 30000, index=0), gpu("w1", 30000, index=0)],
            [("a", "w0", "resident"), ("c", "w1", "resident")],
        ),
        # Unknown demand: admitted anywhere, without a plan.
        ([rec("?", 1, need=None)], [gpu("g0", 10)], [("?", "g0", None)]),
    ],
)
def test_admission(queue, slots, expected):
    assert run(queue, slots) == expected


def test_cpu_slots_take_anything_and_gpus_are_preferred():
    huge = rec("huge", 1, need=10**9)
    assert run([huge], [cpu()]) == [("huge", "cpu", None)]
    assert run([huge], [gpu("g0", 80000), cpu()]) == [("huge", "cpu", None)]
    assert run([rec("a", 1), rec("b", 2)], [cpu(), gpu("g0", 80000)]) == [("a", "g0", "resident"), ("b", "cpu", None)]
    assert run([rec("a", 1)], []) == []


# ---- an aged job is not starved by smaller ones ---------------------------------------------------------


@pytest.mark.parametrize(
    "big_queued_at,total,expected",
    [
        (0.0, 81920, []),  # waited the whole bound, fits the GPU empty: the GPU is kept for it
        (0.9 * HOUR, 81920, [("small", "g0", "resident")]),  # not aged yet: smaller jobs backfill
        (0.0, None, [("small", "g0", "resident")]),  # no GPU size known: no reservation
        (0.0, 30000, [("small", "g0", "resident")]),  # would not fit even empty: nothing to wait for
    ],
)
def test_reservation_for_aged_jobs(big_queued_at, total, expected):
    now = HOUR + 1
    queue = [rec("big", 1, need=70000, queued_at=big_queued_at), rec("small", 2, need=1000, queued_at=now)]
    assert run(queue, [gpu("g0", 20000, total=total)], now=now) == expected
    # Only the GPUs that could hold it are kept: a second, small GPU still takes the small job.
    assert ("small", "s1", "resident") in run(
        queue, [gpu("g0", 20000, total=total), gpu("s1", 2000, total=2000)], now=now
    )


# ---- jobs that fit no GPU at all --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "need,totals,expected",
    [
        (200000, [24576, 81920], True),
        (200000, [24576, 143771], False),
        (150000, [81920], False),  # fits with the planner's group offload (75000)
        (1000, [], False),  # no GPU inventory: not this function's call
    ],
)
def test_fits_nowhere(need, totals, expected):
    assert fits_nowhere(JobDemand("fake", need, 1, 1), totals, plan) is expected


def test_real_planner_end_to_end():
    planner = partial(plan_for, allow_lossy=False)
    real_demand = JobDemand.from_record
    a14b = rec(
        "a14b", 1, params={"width": 1280, "height": 720, "frames": 81}, model="wan2.2-t2v-a14b", architecture=T2V_A14B
    )
    ti2v = rec(
        "ti2v", 2, params={"width": 1280, "height": 704, "frames": 121}, model="wan2.2-ti2v-5b", architecture=TI2V_5B
    )
    slots = [gpu("g0", 24 * GIB), gpu("g1", 80 * GIB)]
    out = run([a14b, ti2v], slots, demand=real_demand, plan=planner)
    # The A14B takes the 80 GiB GPU (resident + VAE tiling beats group offload on 24 GiB); the TI2V-5B
    # then gets the 24 GiB card with model offload + tiling.
    assert out == [("a14b", "g1", "resident"), ("ti2v", "g0", "model")]
    # On an 8 GiB card the A14B fits nowhere: assign leaves it queued, the daemon fails it with the numbers.
    d = real_demand(a14b)
    assert run([a14b], [gpu("g0", 8 * GIB)], demand=real_demand, plan=planner) == []
    assert fits_nowhere(d, [8 * GIB], planner)
    best = strongest_estimate_mb(d)
    msg = insufficient_vram_message(d, [8 * GIB], best)
    assert f"{best} MiB" in msg and "8192 MiB" in msg and "1280x720" in msg and "81 frames" in msg


# ---- the ready queue: the same order and decisions, bounded work ----------------------------------------

MODELS = ("m1", "m2", "m3")
times = st.one_of(st.sampled_from([0.0, 1.0, 2.5, 10.0, 3600.0]), st.floats(0, 1e4))
bounds = st.one_of(st.sampled_from([None, 0, math.inf, 1.0, 60.0, HOUR]), st.floats(0.5, 1e5))


@st.composite
def queued_records(draw, max_size=30):
    """Queued records with unique ids and seqs: few priorities and times (ties), any not_before, some
    records without queued_at (waited() then counts from received_at)."""
    n = draw(st.integers(0, max_size))
    seqs = draw(st.lists(st.integers(0, 10**6), min_size=n, max_size=n, unique=True))
    out = []
    for i, seq in enumerate(seqs):
        received = draw(times)
        queued_at = draw(st.one_of(st.none(), times))
        out.append(
            rec(
                f"j{i}",
                seq,
                priority=draw(st.sampled_from([-1000, -3, 0, 0, 2, 7, 1000])),
                model=draw(st.sampled_from(MODELS)),
                need=draw(st.sampled_from([None, 1000, 20000, 50000, 90000])),
                not_before=draw(st.one_of(st.just(0.0), times)),
            ).model_copy(update={"queued_at": queued_at, "received_at": received})
        )
    return out


def queue_of(records) -> ReadyQueue:
    q = ReadyQueue()
    for r in records:
        q.add(r)
    return q


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(queued_records(), st.lists(st.tuples(times, bounds), min_size=1, max_size=4))
def test_ready_queue_ranks_as_assign(records, decisions):
    # Several decisions on one queue: ``now`` may also go back (backoff jobs then wait again).
    q = queue_of(records)
    for now, bound in decisions:
        assert [r.id for r in q.ranked(now, bound)] == [r.id for r in rank(records, now, bound)]
        for model in MODELS:
            expected = [r.id for r in rank(records, now, bound) if r.model.name == model][:2]
            assert [r.id for r in q.heads([model], now, bound, per_model=2)[model]] == expected


@pytest.mark.parametrize(
    "since_a,since_b,now,expected",
    [
        (1.0, 2.0, 100.0, ["c", "a", "b"]),  # aging: the one queued first goes first, whatever its seq
        (5.0, 6.0, 1.0, ["c", "b", "a"]),  # both "queued" after now (the clock went back): no wait, by seq
        (0.0, 1e-300, 100.0, ["c", "b", "a"]),  # distinct times, one float effective priority: by seq
    ],
)
def test_ready_queue_ties_within_a_priority_go_by_seq(since_a, since_b, now, expected):
    records = [rec("a", 2, queued_at=since_a), rec("b", 1, queued_at=since_b), rec("c", 3, priority=1, queued_at=now)]
    assert [r.id for r in rank(records, now, HOUR)] == expected
    assert [r.id for r in queue_of(records).ranked(now, HOUR)] == expected


slot_lists = st.lists(
    st.one_of(
        st.builds(
            lambda n, free, warm, total: Slot(f"g{n}", n % 2, free, frozenset(warm), total),
            st.integers(0, 3),
            st.sampled_from([500, 10000, 30000, 60000, 100000]),
            st.sets(st.sampled_from(MODELS), max_size=2),
            st.sampled_from([None, 100000]),
        ),
        st.builds(lambda warm: cpu("cpu", warm=warm), st.sets(st.sampled_from(MODELS), max_size=1)),
    ),
    max_size=4,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(queued_records(), slot_lists, times, bounds)
def test_assign_from_decides_as_assign_within_the_window(records, slots, now, bound):
    kw = dict(aging_bound_seconds=bound, demand=demand, plan=plan)
    assert assign_from(queue_of(records), slots, now, **kw) == assign(records, slots, now, **kw)


@pytest.mark.parametrize(
    "window,warm,expected",
    [
        # The whole queue in the window: as assign ("big2" fits neither free GPU, "small" backfills g1).
        (4, (), [("big1", "g0"), ("small", "g1")]),
        (4, {"m2"}, [("big1", "g0"), ("warm", "g1")]),  # affinity within the bucket, as assign
        # Window 2: the jobs deeper than "big1" and "big2" wait for a later decision ...
        (2, (), [("big1", "g0")]),
        # ... except the first job of a model warm on a free slot: affinity looks past the window.
        (2, {"m2"}, [("big1", "g0"), ("warm", "g1")]),
    ],
)
def test_window_keeps_the_first_jobs_and_the_warm_heads(window, warm, expected):
    queue = [
        rec("big1", 1, priority=5, need=50000),
        rec("big2", 2, priority=5, need=50000),
        rec("small", 3, need=1000),
        rec("warm", 4, need=1000, model="m2"),
    ]
    slots = [gpu("g0", 60000), gpu("g1", 20000, warm=warm)]
    kw = dict(aging_bound_seconds=HOUR, demand=demand, plan=plan)
    got = assign_from(queue_of(queue), slots, 0.0, window=window, **kw)
    assert [(a.record.id, a.slot.worker) for a in got] == expected
    if window >= len(queue):
        assert got == assign(queue, slots, 0.0, **kw)


def many(n: int) -> list[JobRecord]:
    """n queued jobs (11 priorities, 3 models, one a second), each needing 60000 MiB."""
    bases = [rec("j", 0, need=60000, model=m) for m in MODELS]
    update = lambda i: {"id": f"j{i}", "seq": i, "priority": i % 11 - 5, "queued_at": float(i)}  # noqa: E731
    return [bases[i % 3].model_copy(update=update(i)) for i in range(n)]


@pytest.mark.parametrize("n", [10_000, 100_000])
def test_a_decision_reads_a_bounded_window(n):
    records, calls = many(n), Counter()

    def counted(name, f):
        return lambda *a: (calls.update([name]), f(*a))[1]

    kw = dict(aging_bound_seconds=HOUR, demand=counted("demand", demand), plan=counted("plan", plan))
    q, now, warm = queue_of(records), float(n), {"m2", "m3"}
    # One free slot that fits no job: every candidate is tried (the worst case), but only the window's.
    tiny = [gpu("g0", 500, warm=warm)]
    assert assign_from(q, tiny, now, **kw) == []
    assert calls["demand"] <= WINDOW + len(warm) and calls["plan"] <= 2 * (WINDOW + len(warm))
    # A slot that fits: the top job goes (the oldest of priority 5, which aging does not overtake).
    calls.clear()
    [a] = assign_from(q, [gpu("g0", 80000)], now, **kw)
    assert a.record.id == "j10" and calls["demand"] == 1
    if n == 10_000:  # the list form ranks and tries the whole queue
        assert rank(records, now, HOUR)[0].id == "j10"
        calls.clear()
        assert assign(records, tiny, now, **kw) == []
        assert calls["demand"] == n


def test_ready_queue_bookkeeping():
    q = ReadyQueue()
    q.add(rec("a", 1, model="m1"))
    q.add(rec("b", 2, priority=5, not_before=10.0, model="m1"))  # in a retry backoff until 10
    q.add(rec("c", 3, model="m2"))
    assert len(q) == 3 and "b" in q and "z" not in q and q.get("c").id == "c" and q.get("z") is None
    assert q.by_priority() == {0: 2, 5: 1}
    ids = lambda now: [r.id for r in q.ranked(now, HOUR)]  # noqa: E731
    assert ids(5.0) == ["a", "c"] and q.advance(5.0) == 2
    assert ids(10.0) == ["b", "a", "c"]  # its time has come
    assert ids(9.0) == ["a", "c"]  # the clock went back: it waits again
    assert q.heads(["m1", "m2", "m9"], 10.0, HOUR) == {"m1": [q.get("b")], "m2": [q.get("c")], "m9": []}
    q.add(rec("a", 1, priority=9))  # a changed record replaces the old one
    assert ids(10.0) == ["a", "b", "c"] and len(q) == 3 and q.by_priority() == {9: 1, 5: 1, 0: 1}
    q.discard("b")
    q.discard("b")  # absent: no-op
    q.add(rec("d", 4, not_before=11.0))  # added after the clock passed 10: waits until 11
    assert ids(10.0) == ["a", "c"] and ids(11.0) == ["a", "c", "d"]
    for job in ("a", "c", "d"):
        q.discard(job)
    assert len(q) == 0 and q.by_priority() == {} and ids(12.0) == [] and q.advance(12.0) == 0
    with pytest.raises(ValueError):
        q.add(rec("r", 5, state=JobState.RUNNING))
