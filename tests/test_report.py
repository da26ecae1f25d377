"""The HTML outbox report and video posters, on real H.264 files; rendered in headless Chromium when present."""

from __future__ import annotations

import html
import json
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from daemon.errors import Category, JobError
from daemon.fsutil import TEMP_PREFIX, atomic_write_json
from daemon.ops.report import TITLE, build_report, write_poster
from daemon.runtime.outbox import Outbox
from daemon.runtime.publishing import TINY_NOTE
from daemon.worker.media import encode_mp4, probe_video

HOSTILE_PROMPT = '<script>alert(1)</script> a fox & a "hound" in the snow'
HOSTILE_FILE = "<img src=x onerror=alert(2)>.yaml"
HOSTILE_MESSAGE = "width: 1000 is not a multiple of 16 <b>bold</b>"


def make_video(path: Path, *, frames: int = 9, size: int = 64, fps: int = 16, graded: bool = False) -> Path:
    rng = np.random.default_rng(0)
    if graded:  # frame i is a flat gray of level i/(frames-1): tells which frame a poster shows
        data = np.stack([np.full((size, size, 3), i / (frames - 1), np.float32) for i in range(frames)])
    else:
        data = rng.random((frames, size, size, 3), dtype=np.float32)
    encode_mp4(data, path, fps=fps, quality=5.0)
    return path


def sidecar(
    job_id: str,
    video: Path,
    *,
    prompt: str,
    model: str,
    tiny: bool,
    gen: float,
    vram: int | None,
    degradations: list | None = None,
    attempts: int = 1,
    finished: str = "2025-06-01T12:00:00+0000",
) -> dict:
    """Shaped like Daemon._sidecar."""
    info = probe_video(video)
    info.pop("path")
    out = {
        "id": job_id,
        "job_token": f"tok-{job_id}",
        "status": "done",
        "file": f"{job_id}.yaml",
        "spec": {"id": job_id, "prompt": prompt},
        "parameters": {
            "task": "t2v",
            "pipeline": "t2v",
            "prompt": prompt,
            "negative_prompt": "",
            "width": 64,
            "height": 64,
            "frames": 9,
            "fps": 16,
            "steps": 3,
            "guidance_scale": 5.0,
            "seed": 42,
            "basename": job_id,
        },
        "model_used": {
            "name": model,
            "architecture": "wan2.2-ti2v-5b",
            "repo_id": None,
            "source": "tiny" if tiny else "hub-cache",
            "tiny_random_weights": tiny,
            "path": "/models/x",
            "cache": "cold",
            "load_seconds": 1.5,
        },
        "device": {"type": "cpu" if vram is None else "cuda", "name": "cpu" if vram is None else "NVIDIA H100"},
        "timings": {
            "queue_wait": 0.2,
            "model_load": 1.5,
            "denoise": gen * 0.7,
            "vae_decode": gen * 0.1,
            "encode": 0.3,
            "total": gen,
        },
        "generation_time_seconds": gen,
        "peak_vram_usage_mb": vram,
        "peak_rss_mb": 900.0,
        "optimizations_applied": ["vae_tiling"] if degradations else [],
        "degradations": degradations or [],
        "attempts": attempts,
        "video": {"file": video.name, **info},
        "versions": {"wan_daemon": "0.1.0"},
        "host": "node-a",
        "instance": "node-a",
        "worker_pid": 1,
        "timestamps": {"received_at": finished, "queued_at": finished, "started_at": finished, "finished_at": finished},
    }
    if tiny:
        out["note"] = TINY_NOTE
    return out


@pytest.fixture
def outbox(tmp_path: Path) -> Path:
    ob = Outbox(tmp_path / "outbox")
    root = ob.root
    jobs = [
        (
            "alpha",
            dict(prompt="A red fox trotting through fresh snow", model="tiny-ti2v-5b", tiny=True, gen=2.5, vram=None),
        ),
        (
            "beta",
            dict(
                prompt=HOSTILE_PROMPT,
                model="wan2.2-ti2v-5b",
                tiny=False,
                gen=412.0,
                vram=23_500,
                attempts=3,
                degradations=[{"kind": "lower_resolution", "from": "1280x704", "to": "896x480"}],
                finished="2025-06-02T12:00:00+0000",
            ),
        ),
        ("gamma", dict(prompt="A lighthouse in a storm", model="wan2.2-ti2v-5b", tiny=False, gen=380.0, vram=21_000)),
    ]
    for job_id, kw in jobs:
        video = make_video(root / f"{job_id}.mp4")
        atomic_write_json(root / f"{job_id}.json", sidecar(job_id, video, **kw))
    # gamma already has a poster beside it: it must be used as it is.
    Image.new("RGB", (64, 64), (200, 30, 30)).save(root / "gamma.jpg", quality=90)
    # Not cards: a temp file, a non-sidecar JSON, a broken one.
    (root / f"{TEMP_PREFIX}delta-1234.json").write_text(json.dumps({"status": "done", "id": "delta"}))
    (root / "notes.json").write_text(json.dumps({"status": "draft", "id": "epsilon"}))
    (root / "broken.json").write_text("{not json")
    ob.write_failure(
        "oom-job",
        JobError(Category.OUT_OF_MEMORY, "CUDA out of memory at 1280x704", ["Lower the resolution"]),
        job_id="oom-job",
        source_name="oom-job.yaml",
        spec={"prompt": "x"},
        attempts=3,
    )
    ob.write_failure(
        "bad-spec",
        JobError(Category.INVALID_SPEC, HOSTILE_MESSAGE),
        job_id=None,
        source_name=HOSTILE_FILE,
        spec=None,
        attempts=0,
    )
    return root


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse_html(text: str) -> _Collector:
    c = _Collector()
    c.feed(text)
    return c


# --- posters -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("at, level", [(0.0, 0.0), (0.5, 0.5), (1.0, 1.0)])
def test_poster_picks_the_frame_at_the_fraction(tmp_path: Path, at: float, level: float):
    video = make_video(tmp_path / "graded.mp4", graded=True)
    poster = write_poster(video, tmp_path / "graded.jpg", at=at)
    assert poster == tmp_path / "graded.jpg"
    assert poster.read_bytes()[:3] == b"\xff\xd8\xff", "JPEG magic"
    with Image.open(poster) as img:
        assert img.format == "JPEG" and img.size == (64, 64)
        mean = np.asarray(img.convert("L"), dtype=np.float32).mean() / 255
    assert abs(mean - level) < 0.06, (at, mean)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graded.jpg", "graded.mp4"], "no temp left"


def test_poster_of_random_video_and_bad_fraction(tmp_path: Path):
    video = make_video(tmp_path / "v.mp4", size=96)
    poster = write_poster(video, tmp_path / "v.jpg")
    with Image.open(poster) as img:
        img.load()
        assert img.size == (96, 96) and img.mode == "RGB"
        assert len(img.getcolors(1 << 16) or range(1 << 16)) > 100, "random frames make a busy picture"
    with pytest.raises(ValueError):
        write_poster(video, tmp_path / "x.jpg", at=1.5)
    with pytest.raises(RuntimeError):
        write_poster(tmp_path / "missing.mp4", tmp_path / "y.jpg")
    assert not (tmp_path / "y.jpg").exists()


# --- the page ----------------------------------------------------------------------------------------------


def test_report_contents(outbox: Path):
    gamma_poster = (outbox / "gamma.jpg").read_bytes()
    out = build_report(outbox, outbox / "report.html")
    assert out == outbox / "report.html"
    text = out.read_text()
    assert f"<title>{TITLE}</title>" in text

    # Cards: the three sidecars with status done, newest first; the others are not cards.
    for job_id in ("alpha", "beta", "gamma"):
        assert f'id="job-{job_id}"' in text
    assert text.index('id="job-beta"') < text.index('id="job-gamma"')
    assert "job-delta" not in text and "epsilon" not in text
    assert "broken.json: unreadable" in text

    # Posters: generated beside the videos where missing, kept where present, linked relatively.
    for job_id in ("alpha", "beta"):
        with Image.open(outbox / f"{job_id}.jpg") as img:
            assert img.format == "JPEG" and img.size == (64, 64)
    assert (outbox / "gamma.jpg").read_bytes() == gamma_poster
    doc = parse_html(text)
    imgs = [a["src"] for t, a in doc.tags if t == "img"]
    assert sorted(imgs) == ["alpha.jpg", "beta.jpg", "gamma.jpg"]
    links = [a["href"] for t, a in doc.tags if t == "a"]
    assert {"alpha.mp4", "beta.mp4", "gamma.mp4"} <= set(links)

    # Hostile text is escaped everywhere; nothing executable or external.
    assert "<script" not in text.lower()
    assert html.escape(HOSTILE_PROMPT) in text
    assert "<img src=x" not in text and html.escape(HOSTILE_FILE) in text
    assert "<b>bold</b>" not in text and html.escape(HOSTILE_MESSAGE) in text
    assert "<link" not in text and "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in text
    assert not any(k.startswith("on") for _t, a in doc.tags for k in a), "no event handler attributes"

    # Facts on the cards.
    page_text = " ".join(doc.text)
    assert HOSTILE_PROMPT in page_text
    assert "tiny-ti2v-5b (tiny)" in page_text and TINY_NOTE in page_text
    assert "64×64, 9 frames at 16 fps" in page_text
    assert "lower_resolution: 1280x704 → 896x480" in page_text
    assert "6 min 52 s" in page_text  # beta's 412 s
    assert "22.9 GiB" in page_text  # beta's 23 500 MiB peak
    assert "(no GPU)" in page_text  # alpha ran on the CPU

    # Failures table.
    assert 'id="failed-oom-job"' in text and 'id="failed-bad-spec"' in text
    assert "out_of_memory" in page_text and "invalid_spec" in page_text
    assert "Lower the resolution" in page_text and "CUDA out of memory at 1280x704" in page_text

    # Charts: inline SVG bars per model.
    assert text.count("<svg") == 2
    assert "Generation time by model" in page_text and "Peak VRAM by model" in page_text
    rects = [a for t, a in doc.tags if t == "rect"]
    assert len(rects) == 3  # generation: tiny + 5b; VRAM: 5b only (alpha ran on the CPU)
    assert not any(p.name.startswith(TEMP_PREFIX) and p.suffix in (".html", ".jpg") for p in outbox.iterdir())


def test_report_elsewhere_links_back_into_the_outbox(outbox: Path, tmp_path: Path):
    out = build_report(outbox, tmp_path / "site" / "deep" / "index.html")
    doc = parse_html(out.read_text())
    for tag, attr in (("img", "src"), ("a", "href")):
        for t, a in doc.tags:
            if t == tag and attr in a:
                target = (out.parent / unquote(a[attr])).resolve()
                assert target.is_file(), a[attr]
                assert target.parent == outbox.resolve()


def test_empty_outbox(tmp_path: Path):
    Outbox(tmp_path / "o")
    text = build_report(tmp_path / "o", tmp_path / "o" / "r.html").read_text()
    assert "No finished videos yet." in text and "No failures." in text and "<svg" in text
    assert not build_report(tmp_path / "nothing-here", tmp_path / "r2.html").read_text().count("job-")


# --- rendered in a real browser ----------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install -y chromium) - page not rendered")
def test_report_renders_in_headless_chromium(outbox: Path, tmp_path: Path):
    page = build_report(outbox, outbox / "report.html")
    url = page.resolve().as_uri()

    dump = chromium(["--dump-dom", url], tmp_path / "profile-dom")
    assert dump.returncode == 0, dump.stderr[-2000:]
    dom = dump.stdout
    doc = parse_html(dom)
    shown = " ".join(doc.text)
    for job_id in ("alpha", "beta", "gamma"):
        assert f'id="job-{job_id}"' in dom
    assert HOSTILE_PROMPT in shown, "the hostile prompt is shown as text"
    assert not any(t == "script" for t, _a in doc.tags), "and never became a script element"
    assert "out_of_memory" in shown and "invalid_spec" in shown and HOSTILE_FILE in shown
    assert sum(t == "svg" for t, _a in doc.tags) == 2

    shot = tmp_path / "shot.png"
    res = chromium(
        [f"--screenshot={shot}", "--window-size=1200,900", "--hide-scrollbars", url], tmp_path / "profile-shot"
    )
    deadline = time.monotonic() + 10
    while not shot.exists() and time.monotonic() < deadline:  # written just before exit; be lenient
        time.sleep(0.1)
    assert shot.is_file(), res.stderr[-2000:]
    with Image.open(shot) as img:
        img.load()
        assert img.size == (1200, 900)
        colors = img.convert("RGB").getcolors(1 << 20)
    assert colors is None or len(colors) > 50, "the screenshot is (nearly) blank"
    # Keep a copy for a human to look at (pytest's tmp_path survives the last few runs).
    shutil.copy(shot, outbox / "report-screenshot.png")
