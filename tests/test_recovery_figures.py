"""What recoveries measured, kept in the state folder, judged against the lease grace."""

from __future__ import annotations

import json

from daemon.ops.lease_check import check_lease_grace
from daemon.runtime.recovery_figures import (
    FIGURES_FILE,
    RecoveryFigures,
    StepTimer,
    grace_advice,
    read_figures,
    record_figures,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_step_timer_keeps_the_longest_gap_between_progress_reports():
    clock = Clock()
    timer = StepTimer(clock)
    for gap in (0.01, 0.5, 0.02, 0.2):
        clock.now += gap
        timer.step()
    clock.now += 0.1
    figures = timer.figures(records=4)
    assert figures.longest_step_seconds == 0.5
    assert abs(figures.seconds - 0.83) < 1e-9
    assert figures.records == 4 and abs(figures.jobs_per_second - 4 / 0.83) < 1e-9


def test_the_worst_recovery_is_kept_beside_the_last(tmp_path):
    slow = RecoveryFigures(records=10, seconds=5.0, longest_step_seconds=2.0, at=1.0)
    quick = RecoveryFigures(records=10_000, seconds=1.2, longest_step_seconds=0.01, at=2.0)
    assert record_figures(tmp_path, slow) == slow
    assert record_figures(tmp_path, quick) == slow  # a quicker one later does not hide the slow share
    kept = read_figures(tmp_path)
    assert kept == {"worst": slow, "last": quick}
    assert json.loads((tmp_path / FIGURES_FILE).read_text())["last"]["records"] == 10_000


def test_an_unreadable_figures_file_is_no_figures(tmp_path):
    (tmp_path / FIGURES_FILE).write_text("{not json")
    assert read_figures(tmp_path) == {}
    (tmp_path / FIGURES_FILE).write_text('{"worst": {"records": "x"}}')
    assert read_figures(tmp_path) == {}
    assert grace_advice(120.0, None) is None


def test_the_grace_must_hold_the_slowest_step_with_its_margin():
    worst = RecoveryFigures(records=9_645, seconds=300.0, longest_step_seconds=10.0, at=0.0)
    assert grace_advice(80.0, worst) is None  # half the grace, 40 s, holds four 10 s steps
    advice = grace_advice(30.0, worst)
    assert advice is not None
    assert "lease_grace_seconds (30)" in advice and "10.00 s" in advice and "at least 80 s" in advice


def test_doctor_warns_about_a_short_grace_and_says_what_it_measured(tmp_path):
    class Instance:
        lease_grace_seconds = 10.0

    class Paths:
        state = tmp_path

    class Settings:
        instance = Instance()
        paths = Paths()

    assert check_lease_grace(Settings()).status == "ok"  # nothing measured yet
    record_figures(tmp_path, RecoveryFigures(records=500, seconds=4.0, longest_step_seconds=3.0, at=0.0))
    check = check_lease_grace(Settings())
    assert check.status == "warn"
    assert "3.00 s" in check.detail and "500 records" in check.detail
    assert "at least 24 s" in check.advice
