"""Cron batches with an injected clock: a fire, a restart, no double submission, misfire policies; and one
schedule end to end through the real daemon and the tiny pipeline."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
import yaml
from pydantic import ValidationError

from daemon.runtime.schedules import CronSubmitter, Schedule, substitute


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


NIGHTLY = dict(name="nightly", cron="0 2 * * *", template="prompt: render of {date} at {time}\nsteps: 2\n")


def submitter(tmp_path, clock, **kw):
    return CronSubmitter(
        [Schedule(**{**NIGHTLY, **kw})], state_dir=tmp_path / "state", inbox=tmp_path / "inbox", clock=clock
    )


def test_fires_once_at_its_time_with_substitutions(tmp_path):
    clock = Clock(ts("2026-11-28T01:59:59"))
    cron = submitter(tmp_path, clock)
    assert cron.tick() == []
    clock.t = ts("2026-11-28T02:00:01")
    [dropped] = cron.tick()
    assert dropped.name == "nightly-20261128T020000.yaml"
    doc = yaml.safe_load(dropped.read_text())
    assert doc == {"id": "nightly-20261128T020000", "prompt": "render of 2026-11-28 at 020000", "steps": 2}
    assert cron.tick() == []  # the same fire is never submitted twice
    clock.t = ts("2026-11-29T02:00:00")
    assert [p.name for p in cron.tick()] == ["nightly-20261129T020000.yaml"]


def test_a_restart_does_not_submit_a_fire_again(tmp_path):
    clock = Clock(ts("2026-11-28T02:00:05"))
    assert len(submitter(tmp_path, clock).tick()) == 1
    (tmp_path / "inbox" / "nightly-20261128T020000.yaml").unlink()  # the daemon took it
    clock.t = ts("2026-11-28T02:03:00")
    assert submitter(tmp_path, clock).tick() == []  # a new process, same state
    assert not list((tmp_path / "inbox").glob("*.yaml"))


def test_a_second_daemon_on_the_same_state_does_not_double_submit(tmp_path):
    clock = Clock(ts("2026-11-28T02:00:05"))
    a, b = submitter(tmp_path, clock), submitter(tmp_path, clock)
    assert len(a.tick()) + len(b.tick()) == 1


def test_a_crash_between_record_and_submission_is_finished_at_restart(tmp_path):
    clock = Clock(ts("2026-11-28T02:00:05"))
    cron = submitter(tmp_path, clock)
    fire = datetime(2026, 11, 28, 2, 0, tzinfo=timezone.utc)
    assert cron._record(cron.schedules[0], fire, "submitting")  # ...and the process died here
    [dropped] = submitter(tmp_path, clock).tick()
    assert dropped.name == "nightly-20261128T020000.yaml"
    record = json.loads((tmp_path / "state" / "fires" / "nightly" / "20261128T020000Z").read_text())
    assert record["state"] == "submitted" and record["file"] == dropped.name


@pytest.mark.parametrize(
    "policy,expected",
    [
        ("skip", []),
        ("run_once", ["20261201T020000"]),
        ("run_all", ["20261129T020000", "20261130T020000", "20261201T020000"]),
    ],
)
def test_fires_missed_while_down_follow_the_misfire_policy(tmp_path, policy, expected):
    clock = Clock(ts("2026-11-28T02:00:05"))
    submitter(tmp_path, clock, misfire=policy).tick()
    for p in (tmp_path / "inbox").glob("*.yaml"):
        p.unlink()
    clock.t = ts("2026-12-01T09:00:00")  # down for three days
    dropped = submitter(tmp_path, clock, misfire=policy).tick()
    assert sorted(p.stem.split("-", 1)[1] for p in dropped) == expected
    states = {p.name: json.loads(p.read_text())["state"] for p in (tmp_path / "state" / "fires" / "nightly").iterdir()}
    assert sum(1 for s in states.values() if s == "missed") == 3 - len(expected)


def test_timezones_and_job_files(tmp_path):
    job = tmp_path / "batch.yaml"
    job.write_text("defaults: {steps: 2}\njobs:\n  - prompt: '{name} {date}'\n")
    clock = Clock(ts("2026-11-28T01:00:30"))  # 02:00 in Paris (UTC+1 in winter)
    cron = CronSubmitter(
        [Schedule(name="paris", cron="0 2 * * *", timezone="Europe/Paris", job=job)],
        state_dir=tmp_path / "s",
        inbox=tmp_path / "in",
        clock=clock,
    )
    [dropped] = cron.tick()
    assert dropped.name == "paris-20261128T020000.yaml"
    assert yaml.safe_load(dropped.read_text())["jobs"][0]["prompt"] == "paris 2026-11-28"


def test_substitutions_leave_yaml_braces_alone():
    fire = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert (
        substitute("output: {basename: x-{date}}\n{unknown}", "n", fire)
        == "output: {basename: x-2026-01-02}\n{unknown}"
    )


@pytest.mark.parametrize(
    "bad", [dict(cron="61 * * * *"), dict(timezone="Mars/Olympus"), dict(job="x.yaml"), dict(template=None)]
)
def test_bad_schedules_are_refused_at_load(bad):
    with pytest.raises(ValidationError):
        Schedule(**{**NIGHTLY, **bad})


def test_a_schedule_runs_end_to_end_through_the_daemon(harness_factory):
    from conftest import wait_for

    h = harness_factory()
    h.settings = h.settings.model_copy(
        update={
            "schedules": [
                Schedule(
                    name="every-minute",
                    cron="* * * * *",
                    misfire_grace_seconds=120,
                    template="model: tiny-ti2v-5b\nprompt: scheduled on {date}\nsteps: 2\n",
                )
            ]
        }
    )
    h.start()
    folder = h.settings.paths.state / "fires" / "every-minute"

    def submitted():
        for p in sorted(folder.iterdir()) if folder.is_dir() else []:
            record = json.loads(p.read_text())
            if record.get("state") == "submitted":
                return record["file"].removesuffix(".yaml")
        return None

    side = h.sidecar(wait_for(submitted, 30, what="a submitted fire"))
    assert side["status"] == "done" and side["spec"]["prompt"].startswith("scheduled on 20")
