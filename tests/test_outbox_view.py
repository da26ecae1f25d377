"""A farm's view from any host: two daemons sharing one inbox keep their histories on local disk, and
``tasks --outbox`` / ``analysis --outbox`` list every daemon's finished jobs from the shared outbox."""

from __future__ import annotations

import json
import os

from conftest import wait_for

from daemon.cli import main
from daemon.ops.outbox_rows import outbox_rows

CUE = "daemon.testing:CueBackend"


def test_two_daemons_keep_local_histories_and_the_outbox_lists_both(
    harness_factory, tmp_path, local_state_home, capsys
):
    alpha = harness_factory(backend=CUE, instance={"id": "alpha"}).start()
    beta = harness_factory(backend=CUE, instance={"id": "beta"}).start()
    for h in (alpha, beta):
        assert h.settings.history.path.parent == local_state_home / "wan-daemon" / "history"
        assert tmp_path not in h.settings.history.path.parents  # not beside the shared inbox
    wait_for(lambda: alpha.daemon.workers_ready() and beta.daemon.workers_ready(), 60, what="workers")
    for n in range(8):
        alpha.drop(f"j{n}.yaml", f"prompt: sleep=0.2\nseed: {n}\n")
    alpha.drop("bad.yaml", "prompt: x\nframes: 2\n")
    sides = [alpha.sidecar(f"j{n}") for n in range(8)]
    alpha.failure("bad")
    owners = {s["instance"] for s in sides}
    assert owners == {"alpha", "beta"}, f"one daemon took every job: {owners}"
    for h in (alpha, beta):
        assert h.settings.history.path.exists()

    rows = outbox_rows(alpha.outbox)
    assert sorted(r["id"] for r in rows) == sorted([f"j{n}" for n in range(8)] + ["bad"])
    assert {r["instance"] for r in rows if r["status"] == "done"} == {"alpha", "beta"}
    bad = next(r for r in rows if r["id"] == "bad")
    assert bad["status"] == "failed" and bad["error_category"] == "invalid_spec"
    done = [r for r in rows if r["status"] == "done"]
    assert all(r["finished_at"] >= r["started_at"] >= r["queued_at"] for r in done)
    assert all(os.path.exists(r["output_video"]) for r in done)

    args = ["--inbox", str(alpha.inbox), "--json", "--last", "100"]
    assert main(["tasks", "--outbox", str(alpha.outbox), *args]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert len(listed) == 9 and {r["instance"] for r in listed if r["status"] == "done"} == {"alpha", "beta"}
    assert main(["tasks", "--outbox", str(alpha.outbox), "--status", "failed", *args]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == ["bad"]
    assert main(["analysis", "--outbox", str(alpha.outbox), "--inbox", str(alpha.inbox), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["done"], result["failed"]) == (8, 1)


def test_the_outbox_view_skips_what_is_not_a_finished_job(tmp_path):
    out = tmp_path / "outbox"
    (out / "failed").mkdir(parents=True)
    (out / "notes.json").write_text('{"hello": 1}')  # not a sidecar
    (out / "broken.json").write_text("{half")
    (out / ".wan-tmp-x.json").write_text('{"status": "done", "job_token": "t"}')  # a temp
    (out / "huge.json").write_bytes(b" " * (5 << 20))
    (out / "ok.json").write_text(
        json.dumps(
            {
                "id": "ok",
                "status": "done",
                "job_token": "t1",
                "parameters": {"width": 64, "height": 64, "frames": 9, "steps": 2, "task": "t2v"},
                "model_used": {"name": "tiny-ti2v-5b"},
                "timestamps": {
                    "queued_at": "2026-12-02T10:00:00.250+00:00",
                    "finished_at": "2026-12-02T10:00:05+00:00",
                },
                "video": {"file": "ok.mp4"},
                "instance": "gpu3",
            }
        )
    )
    (out / "failed" / "f.json").write_text(
        json.dumps(
            {"id": "f", "status": "failed", "error_category": "timeout", "failed_at": "2026-12-02T09:00:00+0000"}
        )
    )
    rows = outbox_rows(out)
    assert [r["id"] for r in rows] == ["ok", "f"]  # newest first
    assert rows[0]["resolution"] == "64x64" and rows[0]["model_used"] == "tiny-ti2v-5b"
    assert rows[0]["finished_at"] - rows[0]["queued_at"] == 4.75
    assert rows[1]["finished_at"] == rows[0]["finished_at"] - 3600 - 5
