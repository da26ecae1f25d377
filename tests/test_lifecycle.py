"""The job state machine, its persistence, the retry policy and the scheduler's order (pure, table-driven)."""

from __future__ import annotations

import json
import random

import pytest
from factories import make_record

from daemon.errors import Category, JobError, classify_exception
from daemon.jobs import TRANSITIONS, InvalidTransition, JobRecord, JobState
from daemon.policy import decide
from daemon.runtime.spool import Spool
from daemon.scheduler import pick_next


def record(job_id="j", *, state=None, **kw) -> JobRecord:
    return make_record(job_id, state=state, **kw)


ALL = [None, *JobState]


@pytest.mark.parametrize("current", ALL)
@pytest.mark.parametrize("new", list(JobState))
def test_only_the_transitions_in_the_table_are_allowed(tmp_path, current, new):
    spool = Spool(tmp_path, "me", clock=lambda: 5.0)
    rec = record(state=current)
    if new in TRANSITIONS[current]:
        out = spool.transition(rec, new, note="n")
        assert out.state is new
        assert spool.load("j").state is new  # persisted before it is returned
        assert out.events[-1] == {"state": new.value, "at": 5.0, "note": "n"}
    else:
        with pytest.raises(InvalidTransition):
            spool.transition(rec, new)
        assert spool.load("j") is None


def test_terminal_states_have_no_way_out():
    assert not TRANSITIONS[JobState.DONE] and not TRANSITIONS[JobState.FAILED]


def test_claim_moves_the_file_and_keeps_intake_order(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    spool = Spool(tmp_path / "state", "me")
    names = []
    for n in ("b.yaml", "a.yaml"):
        (inbox / n).write_text("prompt: x\n")
        names.append(spool.claim(inbox / n).name)
    assert names == sorted(names) and names[0].endswith(".me.b.yaml")
    assert list(inbox.iterdir()) == []
    assert [p.name for p in spool.claimed_files()] == names
    assert spool.claim(inbox / "gone.yaml") is None
    # A new Spool on the same folder continues the sequence: no name is ever reused.
    again = Spool(tmp_path / "state", "me")
    assert again.next_seq() > int(names[-1].split(".")[0])


@pytest.mark.parametrize(
    "category,attempts,retry",
    [
        (Category.WORKER_CRASHED, 1, True),
        (Category.WORKER_CRASHED, 2, True),
        (Category.WORKER_CRASHED, 3, False),  # max_attempts=3 spent: quarantined, not looping forever
        (Category.TIMEOUT, 1, True),
        (Category.DISK_FULL, 1, True),
        (Category.IO_ERROR, 2, True),
        (Category.INVALID_SPEC, 1, False),
        (Category.OUT_OF_MEMORY, 1, False),
        (Category.INSUFFICIENT_VRAM, 1, False),
        (Category.MODEL_NOT_FOUND, 1, False),
        (Category.INTERNAL, 1, False),
    ],
)
def test_retry_decisions(category, attempts, retry):
    d = decide(JobError(category, "x"), attempts, max_attempts=3, base_seconds=2, cap_seconds=30, rng=random.Random(1))
    assert d.retry is retry and d.reason


@pytest.mark.parametrize("attempts,cap", [(1, 2), (2, 4), (3, 8), (6, 30), (20, 30)])
def test_backoff_is_full_jitter_under_an_exponential_cap(attempts, cap):
    delays = [
        decide(
            JobError(Category.IO_ERROR, "x"),
            attempts,
            max_attempts=99,
            base_seconds=2,
            cap_seconds=30,
            rng=random.Random(seed),
        ).delay_seconds
        for seed in range(200)
    ]
    assert all(0 <= d <= cap for d in delays)
    assert max(delays) > cap * 0.9 and min(delays) < cap * 0.1


def test_scheduler_orders_by_priority_then_fifo_and_respects_backoff():
    recs = [
        record("low-old", priority=0, seq=1, state=JobState.QUEUED),
        record("high-new", priority=5, seq=9, state=JobState.QUEUED),
        record("high-old", priority=5, seq=3, state=JobState.QUEUED),
        record("top-backoff", priority=9, seq=2, state=JobState.QUEUED, not_before=100.0),
        record("running", priority=99, seq=0, state=JobState.RUNNING),
    ]
    assert pick_next(recs, now=50.0).id == "high-old"
    assert pick_next(recs, now=100.0).id == "top-backoff"
    assert pick_next([r for r in recs if r.priority == 0], now=0).id == "low-old"
    assert pick_next([], now=0) is None


@pytest.mark.parametrize(
    "exc,category",
    [
        (MemoryError(), Category.OUT_OF_MEMORY),
        (RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), Category.OUT_OF_MEMORY),
        (OSError(28, "No space left on device"), Category.DISK_FULL),
        (PermissionError(13, "denied"), Category.IO_ERROR),
        (ValueError("boom"), Category.INTERNAL),
        (JobError(Category.INVALID_INPUT, "x"), Category.INVALID_INPUT),
    ],
)
def test_exceptions_are_classified_in_one_place(exc, category):
    err = classify_exception(exc)
    assert err.category is category
    assert err.all_suggestions()
    assert JobError.from_dict(err.to_dict()).category is category


# A job.json as daemons before the typed records wrote it: the model as its flat summary, the parameters as a
# plain dict (no fp8 field). Spools left by an older daemon must still load after an upgrade.
OLD_RECORD = {
    "id": "fox",
    "token": "9f2c4e6a8b0d1c3e",
    "state": "queued",
    "source": "000000000007.host.1.fox.yaml",
    "source_name": "fox.yaml",
    "seq": 7,
    "priority": 0,
    "spec": {"prompt": "a fox", "model": "tiny-ti2v-5b"},
    "params": {
        "task": "ti2v",
        "pipeline": "t2v",
        "prompt": "a fox",
        "negative_prompt": "bad",
        "width": 64,
        "height": 64,
        "frames": 9,
        "fps": 24,
        "steps": 3,
        "guidance_scale": 5.0,
        "guidance_scale_2": None,
        "flow_shift": 5.0,
        "seed": 42,
        "seed_was_drawn": False,
        "quality": 8.0,
        "basename": "fox",
        "offload": "none",
        "vae_tiling": False,
        "timeout_seconds": None,
        "loras": [],
        "preset": None,
        "compile": False,
        "cache": None,
        "attention_backend": "native",
        "min_cache_steps": 10,
    },
    "model": {
        "name": "tiny-ti2v-5b",
        "architecture": "wan2.2-ti2v-5b",
        "repo_id": None,
        "revision": None,
        "path": "/models/tiny-ti2v-5b",
        "source": "tiny",
        "tiny_random_weights": True,
        "multiple": 32,
    },
    "input_image": None,
    "attempts": 1,
    "worker": "cpu",
    "received_at": 1764000000.0,
    "queued_at": 1764000000.0,
    "started_at": None,
    "finished_at": None,
    "not_before": 0.0,
    "last_error": None,
    "errors": [],
    "events": [{"state": "queued", "at": 1764000000.0, "note": "from fox.yaml"}],
    "outputs": {},
    "degradations": [],
}


def test_a_record_written_before_typed_records_still_loads(tmp_path):
    spool = Spool(tmp_path / "spool", "host.1")
    (spool.job_dir("fox")).mkdir(parents=True)
    (spool.job_dir("fox") / "job.json").write_text(json.dumps(OLD_RECORD))
    rec = spool.load("fox")
    assert rec is not None and rec.state is JobState.QUEUED
    assert rec.params.steps == 3 and rec.params.basename == "fox" and rec.params.fp8 is False
    assert rec.model.name == "tiny-ti2v-5b" and rec.model.tiny and rec.model.multiple == 32
    assert rec.model.info.frames == 9  # the registry's defaults come back with the name
    assert str(rec.model.path) == "/models/tiny-ti2v-5b"
    assert rec.summary()["model"] == OLD_RECORD["model"]  # what the history and failure records show
    # and it is written back in the typed form, which loads again
    again = spool.transition(rec, JobState.RUNNING, attempts=2)
    assert spool.load("fox") == again
