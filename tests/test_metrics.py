"""The node_exporter textfile: parsed back, values, histogram, escaping, atomic replacement."""

from __future__ import annotations

import math
import os
import re
import threading
from pathlib import Path

import pytest

from daemon.fsutil import TEMP_PREFIX
from daemon.runtime.metrics import DURATION_BUCKETS, KNOWN_STATES, MetricsWriter, escape_label_value, render

HOSTILE = 'we"ird\\inst\nance'


def health(**over):
    base = {
        "version": "0.1.0",
        "state": "busy",
        "instance": "node-a",
        "paused": None,
        "queue_depth": 4,
        "queue_by_priority": {"0": 3, "10": 1},
        "running": {"id": "job-1", "attempt": 1},
        "done": 5,
        "failed": 2,
        "device": {"state": "ready", "pid": 123, "device": "cuda"},
    }
    base.update(over)
    return base


COUNTERS = {"done_total": 7, "failed_total_by_category": {"out_of_memory": 2, "invalid_spec": 1}}
DURATIONS = [
    ("wan2.2-ti2v-5b", 0.5),
    ("wan2.2-ti2v-5b", 45.0),
    ("wan2.2-ti2v-5b", 4000.0),
    ("tiny-ti2v-5b", 1.0),
    ("tiny-ti2v-5b", 2.5),
]
GPUS = [
    {"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_total_mb": 81559, "memory_used_mb": 1024.5},
    {"index": 1, "name": "NVIDIA H100 80GB HBM3", "memory_total_mb": 81559, "memory_used_mb": 0},
]


# --- a strict parser for the text format (used when prometheus_client is not installed) ----------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\\\|\\"|\\n)*)"(,|$)')


def _unescape(v: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "\\": "\\", '"': '"'}[m.group(1)], v)


def strict_parse(text: str) -> dict[str, dict]:
    """{family: {"type", "help", "samples": [(name, labels, value)]}}; raises on anything malformed."""
    assert text.endswith("\n"), "the file must end with a line feed"
    families: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        assert line, "no blank lines"
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in families, f"family {name} declared twice"
            families[name] = {"help": line.split(" ", 3)[3], "type": None, "samples": []}
            current = name
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name == current and kind in ("gauge", "counter", "histogram")
            families[name]["type"] = kind
        else:
            m = _SAMPLE.match(line)
            assert m, f"bad sample line {line!r}"
            name, raw_labels, raw_value = m.groups()
            labels = {}
            pos = 0
            while raw_labels and pos < len(raw_labels):
                lm = _LABEL.match(raw_labels, pos)
                assert lm, f"bad labels {raw_labels!r}"
                labels[lm.group(1)] = _unescape(lm.group(2))
                pos = lm.end()
            fam = families[current]
            allowed = {current} | (
                {current + s for s in ("_bucket", "_sum", "_count")} if fam["type"] == "histogram" else set()
            )
            assert name in allowed, f"{name} outside its family {current}"
            fam["samples"].append((name, labels, float(raw_value)))
    return families


def parse(text: str) -> dict[str, dict]:
    """Both parsers agree on the sample set where prometheus_client is installed; the strict one always runs."""
    ours = strict_parse(text)
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        return ours
    theirs = {}
    for fam in text_string_to_metric_families(text):
        theirs.update({(s.name, tuple(sorted(s.labels.items()))): s.value for s in fam.samples})
    mine = {(n, tuple(sorted(lbl.items()))): v for f in ours.values() for n, lbl, v in f["samples"]}
    assert theirs == mine
    return ours


def samples(fams, metric, /, **labels):
    family = metric
    for suffix in ("_bucket", "_sum", "_count"):
        if metric.endswith(suffix) and metric[: -len(suffix)] in fams:
            family = metric[: -len(suffix)]
    return [
        (lbl, v)
        for n, lbl, v in fams[family]["samples"]
        if n == metric and all(lbl.get(k) == str(val) for k, val in labels.items())
    ]


def value(fams, metric, /, **labels):
    found = samples(fams, metric, **labels)
    assert len(found) == 1, (metric, labels, found)
    return found[0][1]


# --- tests -------------------------------------------------------------------------------------------------


def test_values_and_types():
    fams = parse(render(health(), COUNTERS, DURATIONS, GPUS))
    assert value(fams, "wan_daemon_up") == 1
    assert {lbl["state"]: v for lbl, v in samples(fams, "wan_daemon_state")} == {
        s: (1.0 if s == "busy" else 0.0) for s in KNOWN_STATES
    }
    assert value(fams, "wan_daemon_queue_depth", priority="0") == 3
    assert value(fams, "wan_daemon_queue_depth", priority="10") == 1
    assert value(fams, "wan_daemon_queued_jobs") == 4
    assert value(fams, "wan_daemon_running_jobs") == 1
    assert value(fams, "wan_daemon_paused") == 0
    assert value(fams, "wan_daemon_jobs_done_total") == 7
    assert value(fams, "wan_daemon_jobs_failed_total", category="out_of_memory") == 2
    assert value(fams, "wan_daemon_jobs_failed_total", category="invalid_spec") == 1
    assert value(fams, "wan_daemon_gpu_memory_used_bytes", gpu=0) == 1024.5 * (1 << 20)
    assert value(fams, "wan_daemon_gpu_memory_total_bytes", gpu=1) == 81559 * (1 << 20)
    assert fams["wan_daemon_jobs_done_total"]["type"] == "counter"
    assert fams["wan_daemon_job_duration_seconds"]["type"] == "histogram"
    assert all(f["help"] and f["type"] for f in fams.values())
    for fam in fams.values():  # every series names its daemon
        assert all(lbl["instance_id"] == "node-a" for _n, lbl, _v in fam["samples"])


def test_idle_cpu_host_without_gpus_or_jobs():
    fams = parse(
        render(
            health(state="idle", running=None, queue_by_priority={}, queue_depth=0, paused="disk full"),
            {"done_total": 0, "failed_total_by_category": {}},
            [],
            [],
        )
    )
    assert value(fams, "wan_daemon_state", state="idle") == 1
    assert value(fams, "wan_daemon_state", state="busy") == 0
    assert value(fams, "wan_daemon_running_jobs") == 0
    assert value(fams, "wan_daemon_queued_jobs") == 0
    assert value(fams, "wan_daemon_paused") == 1
    assert samples(fams, "wan_daemon_queue_depth") == []
    assert "wan_daemon_gpu_memory_used_bytes" not in fams
    assert fams["wan_daemon_job_duration_seconds"]["samples"] == []


def test_an_operator_pause_is_a_pause_of_kind_operator_and_its_own_series():
    operator = {"mode": "drain", "free_vram": True, "by": "alice@host", "at": 1.0, "reason": "", "since": 1.0}
    pause = {"kind": "operator", "folder": None, "reason": "paused by alice@host", "since": 1.0}
    fams = parse(
        render(
            health(state="paused", running=None, paused="paused by alice@host", pause=pause, operator_pause=operator),
            COUNTERS,
            [],
        )
    )
    assert value(fams, "wan_daemon_paused") == 1 and value(fams, "wan_daemon_operator_paused") == 1
    assert {lbl["kind"]: v for lbl, v in samples(fams, "wan_daemon_pause_kind")} == {
        "disk_full": 0,
        "unwritable": 0,
        "folder_missing": 0,
        "operator": 1,
    }
    assert value(fams, "wan_daemon_state", state="paused") == 1
    # Under a disk pause as well: the disk's kind is the pause, the operator's still shows.
    disk = {"kind": "disk_full", "folder": "/out", "reason": "disk full", "since": 2.0}
    fams = parse(render(health(paused="disk full", pause=disk, operator_pause=operator), COUNTERS, []))
    assert value(fams, "wan_daemon_pause_kind", kind="disk_full") == 1
    assert value(fams, "wan_daemon_pause_kind", kind="operator") == 0
    assert value(fams, "wan_daemon_operator_paused") == 1
    assert value(parse(render(health(), COUNTERS, [])), "wan_daemon_operator_paused") == 0


def test_histogram_is_cumulative_per_model():
    fams = parse(render(health(), COUNTERS, DURATIONS, GPUS))
    for model, values in (("wan2.2-ti2v-5b", [0.5, 45.0, 4000.0]), ("tiny-ti2v-5b", [1.0, 2.5])):
        buckets = samples(fams, "wan_daemon_job_duration_seconds_bucket", model=model)
        bounds = [float(lbl["le"]) for lbl, _ in buckets]
        counts = [v for _, v in buckets]
        assert bounds == [float(b) for b in DURATION_BUCKETS] + [math.inf]
        assert counts == sorted(counts), "buckets must be cumulative"
        assert counts == [sum(1 for v in values if v <= b) for b in bounds]  # le is inclusive
        assert counts[-1] == value(fams, "wan_daemon_job_duration_seconds_count", model=model) == len(values)
        assert value(fams, "wan_daemon_job_duration_seconds_sum", model=model) == pytest.approx(sum(values))
    assert value(fams, "wan_daemon_job_duration_seconds_bucket", model="tiny-ti2v-5b", le="1.0") == 1


def test_label_values_are_escaped():
    assert escape_label_value('a\\b"c\nd') == 'a\\\\b\\"c\\nd'
    text = render(
        health(instance=HOSTILE, state='odd"state'),
        {"done_total": 1, "failed_total_by_category": {'cat"\n\\': 3}},
        [('model "x"\n\\y', 3.0)],
        [{"index": 0, "name": 'G"P\nU', "memory_total_mb": 1, "memory_used_mb": 1}],
    )
    assert len([ln for ln in text.splitlines() if not ln.startswith("#")]) == text.count("} "), (
        "a raw newline in a label split a line"
    )
    fams = parse(text)
    assert value(fams, "wan_daemon_jobs_failed_total", category='cat"\n\\') == 3
    assert value(fams, "wan_daemon_state", state='odd"state') == 1
    assert value(fams, "wan_daemon_job_duration_seconds_count", model='model "x"\n\\y') == 1
    assert value(fams, "wan_daemon_gpu_memory_total_bytes", name='G"P\nU') == 1 << 20
    assert all(lbl["instance_id"] == HOSTILE for f in fams.values() for _n, lbl, _v in f["samples"])


def test_writer_replaces_atomically_and_leaves_no_temp(tmp_path: Path):
    path = tmp_path / "wan-daemon.prom"
    writer = MetricsWriter(path)
    writer.write(health(), COUNTERS, DURATIONS)
    first = path.read_text()
    assert value(parse(first), "wan_daemon_jobs_done_total") == 7
    old = open(path)  # held open: its inode cannot be reused, and it must keep the first contents

    # A reader polling the file during many rewrites only ever sees complete files.
    stop = threading.Event()
    seen: list[str] = []

    def reader():
        while not stop.is_set():
            seen.append(path.read_text())

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(50):
            writer.write(health(), {"done_total": 100 + i, "failed_total_by_category": {}}, DURATIONS * 20, GPUS)
    finally:
        stop.set()
        t.join()
    assert seen
    for text in seen:
        parse(text)
    fams = parse(path.read_text())
    assert value(fams, "wan_daemon_jobs_done_total") == 149
    with old:
        assert os.fstat(old.fileno()).st_ino != path.stat().st_ino, "replaced by rename, not rewritten in place"
        assert old.read() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wan-daemon.prom"], "no temp file left behind"
    assert oct(path.stat().st_mode & 0o777) == oct(0o644), "node_exporter runs as another user"


def test_temp_file_is_never_named_prom(tmp_path: Path, monkeypatch):
    """node_exporter reads every *.prom file: a temp file with that suffix would be scraped half-written."""
    import daemon.fsutil as fsutil

    created: list[str] = []
    real_open = os.open

    def spy_open(path, flags, *args):
        if flags & os.O_CREAT:
            created.append(os.path.basename(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(fsutil.os, "open", spy_open)
    MetricsWriter(tmp_path / "m.prom").write(health(), COUNTERS, DURATIONS)
    assert created and all(n.startswith(TEMP_PREFIX) and not n.endswith(".prom") for n in created), created
    assert (tmp_path / "m.prom").is_file()


def test_failed_write_leaves_old_file_and_no_temp(tmp_path: Path, monkeypatch):
    path = tmp_path / "m.prom"
    MetricsWriter(path).write(health(), COUNTERS, DURATIONS)
    before = path.read_text()

    import daemon.runtime.metrics as metrics

    real_replace = os.replace

    def boom(src, dst):  # the staged ".tmp" file is written; renaming it over the real name fails
        if Path(dst) == path:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(metrics.os, "replace", boom)
    with pytest.raises(OSError):
        MetricsWriter(path).write(health(state="idle"), COUNTERS, DURATIONS)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.prom"]


# ---- what the metrics and the health file say over a process's life ------------------------------------------


def test_a_priority_seen_once_stays_a_series_at_zero(tmp_path):
    writer = MetricsWriter(tmp_path / "m.prom")
    writer.write({"instance": "a", "state": "busy", "queue_by_priority": {"5": 2, "0": 1}}, {}, [])
    writer.write({"instance": "a", "state": "idle", "queue_by_priority": {}}, {}, [])
    text = (tmp_path / "m.prom").read_text()
    assert 'wan_daemon_queue_depth{instance_id="a",priority="5"} 0' in text
    assert 'wan_daemon_queue_depth{instance_id="a",priority="0"} 0' in text


def test_up_is_0_in_the_file_written_as_the_daemon_stops():
    assert 'wan_daemon_up{instance_id="a"} 1' in render({"instance": "a", "state": "idle"}, {}, [])
    assert 'wan_daemon_up{instance_id="a"} 0' in render({"instance": "a", "state": "stopped"}, {}, [])


def test_models_are_labelled_by_name_never_by_a_local_path():
    text = render({"instance": "a"}, {}, [("/srv/models/my-wan-5b", 3.0), ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", 9.0)])
    assert 'model="my-wan-5b"' in text and "/srv/models" not in text
    assert 'model="Wan-AI/Wan2.2-TI2V-5B-Diffusers"' in text


def test_the_duration_histogram_counts_every_job_of_the_process(tmp_path):
    """A counter never falls: the count after 12,000 jobs is 12,000, not the size of a window of recent ones."""
    from daemon.config import load_settings
    from daemon.ops.inventory import StaticInventory
    from daemon.runtime.notify import SystemdNotifier
    from daemon.runtime.status import Status

    settings = load_settings(None, {"paths": {"inbox": str(tmp_path / "in"), "outbox": str(tmp_path / "out")}})
    status = Status(settings, clock=lambda: 0.0, notifier=SystemdNotifier(None), inventory=StaticInventory([]))
    status.metrics = MetricsWriter(tmp_path / "m.prom")
    for n in range(12_000):
        status.job_done(f"j{n}", "tiny-ti2v-5b", 1.0 + n % 7, {})
    status._write_metrics({"instance": "a", "state": "idle"}, force=True)
    text = (tmp_path / "m.prom").read_text()
    assert 'wan_daemon_job_duration_seconds_count{instance_id="a",model="tiny-ti2v-5b"} 12000' in text
    assert 'wan_daemon_job_duration_seconds_bucket{instance_id="a",model="tiny-ti2v-5b",le="+Inf"} 12000' in text


def test_jobs_waiting_for_a_starting_worker_are_not_idle_and_up_ends_at_0(harness_factory, tmp_path):
    prom = tmp_path / "metrics" / "wan-daemon.prom"
    prom.parent.mkdir()
    h = harness_factory(
        backend="daemon.testing:SlowStartCueBackend", metrics={"textfile": str(prom), "interval_seconds": 0.1}
    ).start()
    h.drop("w.yaml", "prompt: sleep=0.01\n")
    health = h.settings.health_path

    def state():
        import json

        try:
            return json.loads(health.read_text())["state"]
        except (OSError, ValueError):
            return None

    from conftest import wait_for

    wait_for(lambda: state() == "waiting_for_worker", 20, interval=0.02, what="waiting_for_worker")
    h.sidecar("w")
    h.idle()
    wait_for(lambda: state() == "idle", 10, what="idle once done")
    h.stop()
    assert 'wan_daemon_up{instance_id="' in prom.read_text() and re.search(
        r"wan_daemon_up\{[^}]*\} 0\n", prom.read_text()
    )
