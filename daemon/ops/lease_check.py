"""``wan-daemon doctor``'s check of the lease grace against what recoveries measured on this spool
(daemon.runtime.recovery_figures)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from daemon.runtime.recovery_figures import grace_advice, read_figures

if TYPE_CHECKING:
    from daemon.ops.doctor import Check


def check_lease_grace(settings) -> Check:
    from daemon.ops.doctor import Check

    grace = settings.instance.lease_grace_seconds
    worst = read_figures(settings.paths.state).get("worst")
    if worst is None:
        return Check("lease grace", "ok", f"{grace:g} s; no recovery measured on this spool yet")
    detail = (
        f"{grace:g} s; slowest recovery step measured {worst.longest_step_seconds:.2f} s "
        f"({worst.records} records in {worst.seconds:.1f} s, {worst.jobs_per_second:.0f} jobs/s)"
    )
    advice = grace_advice(grace, worst)
    return Check("lease grace", "ok" if advice is None else "warn", detail, advice or "")
