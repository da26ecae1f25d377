"""Ranking the queue: effective priority with linear aging, and the ReadyQueue that keeps the queued jobs
in that order as they come and go, so a decision reads the best few instead of sorting the whole queue.

Pure: no torch, no I/O, no clock (``now`` is passed in). The rules it ranks by are daemon.scheduler's (see its
module docstring); daemon.runtime.book keeps one ReadyQueue of its queued records.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from itertools import islice
from operator import itemgetter
from typing import NamedTuple, TypeGuard

from sortedcontainers import SortedList

from daemon.jobs import JobRecord, JobState

PRIORITY_MIN, PRIORITY_MAX = -1000, 1000  # daemon/spec.py JobSpec.priority bounds
PRIORITY_SPAN = PRIORITY_MAX - PRIORITY_MIN


# ---- aging ------------------------------------------------------------------------------------------


def _aging_on(aging_bound_seconds: float | None) -> TypeGuard[float]:
    return aging_bound_seconds is not None and 0 < aging_bound_seconds < math.inf


def waited(record: JobRecord, now: float) -> float:
    since = record.queued_at if record.queued_at is not None else record.received_at
    return max(0.0, now - since)


def effective_priority(
    record: JobRecord, now: float, aging_bound_seconds: float | None, *, span: float | None = None
) -> float:
    """``priority + waited / aging_bound * span``.

    ``span`` is the priority distance aging must cover within the bound. Default :data:`PRIORITY_SPAN`
    (2000, the whole allowed range): every job then reaches the top possible priority within the bound,
    whatever else arrives. :func:`assign` passes the span of the priorities actually waiting (max - min),
    so that with priorities 0 and 10 a priority-0 job overtakes fresh priority-10 jobs after the bound,
    not after bound/200. Aging is off (plain priority) when the bound is None, 0 or infinite.
    """
    if not _aging_on(aging_bound_seconds):
        return float(record.priority)
    span = PRIORITY_SPAN if span is None else span
    return record.priority + waited(record, now) / aging_bound_seconds * span


# ---- ranking ------------------------------------------------------------------------------------------

WINDOW = 256  # assign_from's default window (module doc, "Window")
Ranked = list[tuple[JobRecord, float]]  # (record, effective priority), best first


def _rank_pairs(queued: Iterable[JobRecord], now: float, aging_bound_seconds: float | None) -> Ranked:
    ready = [r for r in queued if r.state is JobState.QUEUED and r.not_before <= now]
    if not ready:
        return []
    span = max(r.priority for r in ready) - min(r.priority for r in ready)
    pairs = [(r, effective_priority(r, now, aging_bound_seconds, span=span)) for r in ready]
    pairs.sort(key=lambda p: (-p[1], p[0].seq))
    return pairs


def rank(queued: Iterable[JobRecord], now: float, aging_bound_seconds: float | None) -> list[JobRecord]:
    """The ready jobs in :func:`assign`'s order: effective priority (span: theirs) descending, then seq."""
    return [r for r, _ in _rank_pairs(queued, now, aging_bound_seconds)]


_Item = tuple[float, int, str, JobRecord]  # (-effective priority, seq, job id, record): rank order


class _Entry(NamedTuple):  # a queued job's keys, kept as added
    priority: int
    model: str
    at: tuple[float, int, str]  # in the timeline: (not_before, seq, job id)
    by_since: tuple[float, int, str, JobRecord]  # (queued_at or received_at: waited()'s start, seq, id, record)
    by_seq: tuple[int, str, JobRecord]


class ReadyQueue:
    """The queued jobs (state QUEUED), indexed so that a decision costs O(window), not O(n log n). Pure.

    All jobs sit in a timeline by ``not_before``; those it has passed (the last ``now``, :meth:`advance`) are
    ready, in sorted collections per (priority, model): by (waited()'s start, seq), an order time does not
    change within a priority, and by seq (no aging). :meth:`ranked` merges them lazily into :func:`rank`'s
    order. Records are kept as added: :meth:`add` a changed one again. Do not mutate while iterating."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._timeline = SortedList()  # _Entry.at of every job
        self._horizon = -math.inf  # the last ``now``: the jobs with not_before <= it are ready, in _groups
        self._groups: dict[str, dict[int, tuple[SortedList, SortedList]]] = {}  # model -> priority -> ready
        self._ready: Counter[int] = Counter()  # priority -> ready jobs (zeros stay: one per priority seen)
        self._all: Counter[int] = Counter()  # priority -> queued jobs

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._entries

    def get(self, job_id: str) -> JobRecord | None:
        return e.by_seq[2] if (e := self._entries.get(job_id)) is not None else None

    def by_priority(self) -> dict[int, int]:
        """Queued jobs per priority (ready or in a backoff)."""
        return {p: n for p, n in self._all.items() if n}

    def add(self, record: JobRecord) -> None:
        """Add (or replace) a QUEUED record: O(log n)."""
        if record.state is not JobState.QUEUED:
            raise ValueError(f"job {record.id} is {record.state}, not queued")
        self.discard(record.id)
        r, since = record, record.queued_at if record.queued_at is not None else record.received_at
        e = _Entry(r.priority, r.model.name, (r.not_before, r.seq, r.id), (since, r.seq, r.id, r), (r.seq, r.id, r))
        self._entries[r.id] = e
        self._all[e.priority] += 1
        self._timeline.add(e.at)
        if r.not_before <= self._horizon:
            self._move(e, ready=True)

    def discard(self, job_id: str) -> None:
        """Remove a job (no-op when absent): O(log n)."""
        if (e := self._entries.pop(job_id, None)) is not None:
            self._all[e.priority] -= 1
            self._timeline.remove(e.at)
            if e.at[0] <= self._horizon:
                self._move(e, ready=False)

    def advance(self, now: float) -> int:
        """Make the jobs with ``not_before <= now`` ready, and only them (O(log n) a move); how many are."""
        lo, hi = sorted((self._horizon, now))
        if lo != hi:
            changed = list(self._timeline.irange((lo, math.inf), (hi, math.inf), inclusive=(False, True)))
            for _, _, job_id in changed:
                self._move(self._entries[job_id], ready=now > self._horizon)
            self._horizon = now
        return sum(self._ready.values())

    def _move(self, e: _Entry, ready: bool) -> None:
        groups = self._groups.setdefault(e.model, {})
        by_since, by_seq = groups.get(e.priority) or groups.setdefault(e.priority, (SortedList(), SortedList()))
        if ready:
            by_since.add(e.by_since)
            by_seq.add(e.by_seq)
        else:
            by_since.remove(e.by_since)
            by_seq.remove(e.by_seq)
            if not by_seq:
                del groups[e.priority]
            if not groups:
                del self._groups[e.model]
        self._ready[e.priority] += 1 if ready else -1

    # ---- lazy merges of the (priority, model) collections: O(log m) per job for m collections

    def ranked(self, now: float, aging_bound_seconds: float | None) -> Iterator[JobRecord]:
        """The ready jobs in :func:`rank`'s order, lazily: the first k in O(m + k log m)."""
        return (item[3] for item in self._items(now, aging_bound_seconds, None))

    def heads(
        self, model_names: Iterable[str], now: float, aging_bound_seconds: float | None, per_model: int = 1
    ) -> dict[str, list[JobRecord]]:
        """The first ``per_model`` ready jobs (in rank order) of each model named."""
        return {m: [i[3] for i in islice(self._items(now, aging_bound_seconds, m), per_model)] for m in model_names}

    def window(self, now: float, aging_bound_seconds: float | None, size: int, warm: Mapping[str, int]) -> Ranked:
        """:func:`assign_from`'s candidates, (record, effective priority) in rank order: the first ``size``
        ranked jobs, plus the first ``warm[m]`` jobs of each model ``m``."""
        items = list(islice(self._items(now, aging_bound_seconds, None), size))
        ids = {i[2] for i in items}
        heads = {i[2]: i for m, k in warm.items() for i in islice(self._items(now, aging_bound_seconds, m), k)}
        items += [i for job_id, i in heads.items() if job_id not in ids]
        return [(i[3], -i[0]) for i in (sorted(items) if len(items) > len(ids) else items)]

    def _items(self, now: float, aging_bound_seconds: float | None, model: str | None) -> Iterator[_Item]:
        if not self.advance(now):
            return iter(())
        span = max(p for p, n in self._ready.items() if n) - min(p for p, n in self._ready.items() if n)
        models = self._groups.values() if model is None else [self._groups.get(model, {})]
        walks = [_walk(p, g, now, aging_bound_seconds, span) for groups in models for p, g in groups.items()]
        return walks[0] if len(walks) == 1 else heapq.merge(*walks)


def _walk(p: int, group: tuple[SortedList, SortedList], now: float, bound: float | None, span: int) -> Iterator[_Item]:
    """One (priority, model) collection in rank order. Aging: by waited()'s start; distinct starts can give
    one effective priority (a start >= now clamps the wait to 0; float rounding): that run is sorted by seq."""
    lst, by_seq = group
    if not _aging_on(bound) or span == 0:
        yield from ((-float(p), seq, job_id, rec) for seq, job_id, rec in by_seq)
        return

    def neg_of(since: float) -> float:  # -effective_priority(), inlined (below too): the same float operations
        w = now - since
        return -(p + (w if w > 0.0 else 0.0) / bound * span)

    n, pos = len(lst), 0
    while pos < n:
        it = lst.islice(pos)
        cur = next(it)
        neg = neg_of(cur[0])
        for nxt in it:
            w = now - nxt[0]
            nxt_neg = -(p + (w if w > 0.0 else 0.0) / bound * span)
            if nxt_neg == neg:
                break
            yield (neg, cur[1], cur[2], cur[3])
            cur, neg, pos = nxt, nxt_neg, pos + 1
        else:
            yield (neg, cur[1], cur[2], cur[3])
            return
        # A run of one effective priority from pos: its end by bisection, then in seq order.
        end = tie = lst.bisect_right((cur[0], math.inf))
        while tie < n and neg_of(lst[tie][0]) == neg:
            tie = lst.bisect_right((lst[tie][0], math.inf))
        run = lst.islice(pos, tie)
        yield from ((neg, s, j, r) for _, s, j, r in (sorted(run, key=itemgetter(1)) if tie > end else run))
        pos = tie
