"""A static HTML page of the outbox, for people who would rather look than read JSON.

``build_report`` writes one self-contained page: a card per finished video (poster, prompt, model,
timings, memory, what was degraded), the failures with their suggestions, and bar charts of generation
time and peak VRAM by model as inline SVG. No JavaScript and no external assets: the only links are the
posters and videos beside it, by relative URL. Every string from a job or sidecar is HTML-escaped.
"""

from __future__ import annotations

import html
import io
import json
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from daemon.fsutil import atomic_write_bytes

TITLE = "wan-daemon report"
POSTER_QUALITY = 85


# --- posters -----------------------------------------------------------------------------------------------


def write_poster(video_path: Path, poster_path: Path, *, at: float = 0.5) -> Path:
    """Save the frame at fraction ``at`` (0 = first, 1 = last) of the video as a JPEG, atomically.

    Frames are decoded with imageio-ffmpeg (a first pass counts them, a second stops at the one wanted, so
    memory stays at one frame). Raises ValueError for an ``at`` outside [0, 1] or a video without frames.
    """
    import imageio_ffmpeg
    from PIL import Image

    if not 0.0 <= at <= 1.0:
        raise ValueError(f"at must be within [0, 1], not {at}")
    video_path, poster_path = Path(video_path), Path(poster_path)
    count, _secs = imageio_ffmpeg.count_frames_and_secs(str(video_path))
    if count < 1:
        raise ValueError(f"{video_path} has no frames")
    index = min(count - 1, max(0, round(at * (count - 1))))
    reader = imageio_ffmpeg.read_frames(str(video_path))
    try:
        meta = next(reader)
        frame = None
        for i, data in enumerate(reader):
            frame = data
            if i == index:
                break
    finally:
        reader.close()
    if frame is None:
        raise ValueError(f"{video_path} has no frames")
    width, height = meta["size"]
    image = Image.frombytes("RGB", (width, height), bytes(frame))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=POSTER_QUALITY)
    atomic_write_bytes(poster_path, buf.getvalue())
    return poster_path


# --- reading the outbox ------------------------------------------------------------------------------------


def _load_json_records(folder: Path) -> tuple[list[tuple[Path, dict[str, Any]]], list[str]]:
    records: list[tuple[Path, dict[str, Any]]] = []
    problems: list[str] = []
    if not folder.is_dir():
        return records, problems
    for path in sorted(folder.glob("*.json")):
        if path.name.startswith(".") or not path.is_file():  # temps (.wan-tmp-*) and hidden files
            continue
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            problems.append(f"{path.name}: unreadable ({exc})")
            continue
        if isinstance(data, dict):
            records.append((path, data))
        else:
            problems.append(f"{path.name}: not a JSON object")
    return records, problems


def _mapping(record: dict[str, Any], key: str) -> dict[str, Any]:
    """``record[key]`` when it is a mapping, else an empty one (records are read from disk, any shape)."""
    value = record.get(key)
    return value if isinstance(value, dict) else {}


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _fmt_seconds(value: Any) -> str:
    v = _num(value)
    if v is None:
        return "—"
    if v >= 3600:
        return f"{int(v // 3600)} h {int(v % 3600 // 60)} min"
    if v >= 120:
        return f"{int(v // 60)} min {int(v % 60)} s"
    return f"{v:.2f} s" if v < 10 else f"{v:.1f} s"


def _fmt_mb(value: Any) -> str:
    v = _num(value)
    if v is None:
        return "—"
    return f"{v / 1024:.1f} GiB" if v >= 1024 else f"{v:.0f} MiB"


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _href(target: Path, base: Path) -> str:
    rel = os.path.relpath(target, base)
    return quote(Path(rel).as_posix())


# --- SVG charts --------------------------------------------------------------------------------------------

_PALETTE = ["#3b6fd4", "#d4793b", "#2f9e6e", "#a34fc2", "#c23b5a", "#6b7b8c"]


def svg_bar_chart(title: str, rows: list[tuple[str, float, str]]) -> str:
    """A horizontal bar chart: one bar per (label, value, note). Pure SVG, text escaped."""
    # Room for the longest label and note at about 7 px per character of 12 px text.
    label_w = max(90, 10 + 7 * max((len(label) for label, _v, _n in rows), default=0))
    value_w = max(120, 12 + 7 * max((len(note) for _l, _v, note in rows), default=0))
    bar_w, row_h, top = 320, 28, 34
    width = label_w + bar_w + value_w
    height = top + row_h * max(1, len(rows)) + 10
    peak = max((v for _l, v, _n in rows), default=0.0) or 1.0
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" aria-label="{_e(title)}" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
        f"<title>{_e(title)}</title>",
        f'<text x="0" y="20" class="chart-title">{_e(title)}</text>',
    ]
    if not rows:
        parts.append(f'<text x="0" y="{top + 18}" class="chart-empty">no data</text>')
    for i, (label, value, note) in enumerate(rows):
        y = top + i * row_h
        w = max(2.0, bar_w * value / peak)
        color = _PALETTE[i % len(_PALETTE)]
        parts.append(f'<text x="{label_w - 8}" y="{y + 18}" text-anchor="end" class="chart-label">{_e(label)}</text>')
        parts.append(
            f'<rect x="{label_w}" y="{y + 4}" width="{w:.1f}" height="{row_h - 8}" rx="3" fill="{color}">'
            f"<title>{_e(label)}: {_e(note)}</title></rect>"
        )
        parts.append(f'<text x="{label_w + w + 6:.1f}" y="{y + 18}" class="chart-value">{_e(note)}</text>')
    parts.append("</svg>")
    return "".join(parts)


# --- page --------------------------------------------------------------------------------------------------

_CSS = """
:root { --fg:#1d2430; --muted:#5b6675; --line:#dde2ea; --bg:#f5f7fa; --card:#fff; --warn:#8a5a00; --bad:#a3222f; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); }
header, main { max-width: 1180px; margin: 0 auto; padding: 0 20px; }
header { padding-top: 24px; }
h1 { margin: 0 0 4px; font-size: 26px; }
h2 { font-size: 19px; margin: 28px 0 12px; }
.summary { color: var(--muted); margin: 0; }
.summary b { color: var(--fg); }
.charts { display: flex; flex-wrap: wrap; gap: 16px; }
.charts figure { margin: 0; background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px;
                 overflow-x: auto; max-width: 100%; }
.chart-title { font: 600 14px system-ui, sans-serif; fill: var(--fg); }
.chart-label, .chart-value, .chart-empty { font: 12px system-ui, sans-serif; fill: var(--muted); }
.chart-label { fill: var(--fg); }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 16px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; overflow: hidden;
        display: flex; flex-direction: column; }
.poster { display: block; background: #111; aspect-ratio: 16 / 9; overflow: hidden; min-height: 0; }
.poster img { width: 100%; height: 100%; object-fit: contain; display: block; image-rendering: auto; }
.poster .none { color: #aaa; display: flex; height: 100%; align-items: center; justify-content: center; }
.body { padding: 10px 14px 14px; }
.card h3 { margin: 0 0 6px; font-size: 16px; word-break: break-all; }
.prompt { margin: 0 0 10px; max-height: 7.5em; overflow: auto; white-space: pre-wrap; word-wrap: break-word; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px; margin: 0; font-size: 13px; }
dt { color: var(--muted); }
dd { margin: 0; word-break: break-word; }
.note { margin: 10px 0 0; padding: 6px 8px; border-radius: 6px; background: #fff4d6; color: var(--warn);
        font-size: 13px; }
.degraded { color: var(--warn); font-weight: 600; }
table { width: 100%; border-collapse: collapse; background: var(--card); border: 1px solid var(--line); }
th, td { text-align: left; vertical-align: top; padding: 8px 10px; border-bottom: 1px solid var(--line); }
th { background: #eef1f6; font-weight: 600; }
td.cat { color: var(--bad); font-weight: 600; white-space: nowrap; }
td ul { margin: 0; padding-left: 18px; }
.empty { color: var(--muted); }
.problems { color: var(--bad); }
footer { max-width: 1180px; margin: 24px auto 40px; padding: 0 20px; color: var(--muted); font-size: 12px; }
"""


def _degradation_text(d: Any) -> str:
    if isinstance(d, dict):
        kind = d.get("kind", "degraded")
        if "from" in d or "to" in d:
            return f"{kind}: {d.get('from', '?')} → {d.get('to', '?')}"
        return str(kind)
    return str(d)


def _card(sidecar: dict[str, Any], sidecar_path: Path, outbox: Path, base: Path) -> str:
    video = _mapping(sidecar, "video")
    params = _mapping(sidecar, "parameters")
    model = _mapping(sidecar, "model_used")
    timings = _mapping(sidecar, "timings")
    device = _mapping(sidecar, "device")
    job_id = sidecar.get("id") or sidecar_path.stem

    video_name = Path(str(video.get("file") or f"{sidecar_path.stem}.mp4")).name  # never a path out of the outbox
    video_path = outbox / video_name
    poster = video_path.with_suffix(".jpg")
    if not poster.is_file() and video_path.is_file():
        try:
            write_poster(video_path, poster)
        except Exception:  # a broken video or a read-only outbox: the card goes without a picture
            pass
    if poster.is_file():
        picture = f'<img src="{_e(_href(poster, base))}" alt="poster frame of {_e(job_id)}">'
    else:
        picture = '<span class="none">no preview</span>'
    if video_path.is_file():
        picture = f'<a class="poster" href="{_e(_href(video_path, base))}" title="open the video">{picture}</a>'
    else:
        picture = f'<div class="poster">{picture}</div>'

    width = video.get("width", params.get("width"))
    height = video.get("height", params.get("height"))
    frames = video.get("frames", params.get("frames"))
    fps = video.get("fps", params.get("fps"))
    fps_text = f"{_num(fps):g}" if _num(fps) is not None else "—"
    size_text = f"{width}×{height}, {frames} frames at {fps_text} fps"
    frames_num, fps_num = _num(frames), _num(fps)
    secs = frames_num / fps_num if frames_num and fps_num else None
    if secs:
        size_text += f" ({secs:.1f} s)"
    model_text = str(model.get("name") or params.get("model") or "?")
    if model.get("source"):
        model_text += f" ({model['source']})"
    device_text = str(device.get("type") or "—")
    if device.get("name") and device.get("name") != device.get("type"):
        device_text += f" ({device['name']})"
    timing_bits = [
        f"{label} {_fmt_seconds(timings[key])}"
        for key, label in (
            ("denoise", "denoise"),
            ("vae_decode", "decode"),
            ("encode", "encode"),
            ("model_load", "load"),
            ("queue_wait", "queue"),
        )
        if key in timings
    ]
    degradations = sidecar.get("degradations") or []
    degr_html = (
        '<span class="degraded">' + "; ".join(_e(_degradation_text(d)) for d in degradations) + "</span>"
        if degradations
        else "none"
    )
    optimizations = sidecar.get("optimizations_applied") or []
    finished = (
        (sidecar.get("timestamps") or {}).get("finished_at") if isinstance(sidecar.get("timestamps"), dict) else None
    )

    rows = [
        ("model", _e(model_text)),
        ("video", _e(size_text)),
        ("seed", _e(params.get("seed", "—"))),
        ("device", _e(device_text)),
        ("generation", f"<b>{_e(_fmt_seconds(sidecar.get('generation_time_seconds')))}</b>"),
        ("timings", _e(" · ".join(timing_bits) or "—")),
        (
            "peak VRAM",
            _e(
                _fmt_mb(sidecar.get("peak_vram_usage_mb"))
                + (" (no GPU)" if sidecar.get("peak_vram_usage_mb") is None else "")
            ),
        ),
        ("attempts", _e(sidecar.get("attempts", "—"))),
        ("degradations", degr_html),
    ]
    if optimizations:
        rows.append(("memory measures", _e(", ".join(str(o) for o in optimizations))))
    if finished:
        rows.append(("finished", _e(finished)))
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    note = f'<p class="note">{_e(sidecar["note"])}</p>' if sidecar.get("note") else ""
    spec = _mapping(sidecar, "spec")
    prompt = params.get("prompt") or spec.get("prompt") or ""
    return (
        f'<article class="card" id="job-{_e(job_id)}">{picture}<div class="body">'
        f'<h3>{_e(job_id)}</h3><p class="prompt">{_e(prompt)}</p><dl>{dl}</dl>{note}</div></article>'
    )


def _failures_table(failures: list[tuple[Path, dict[str, Any]]]) -> str:
    if not failures:
        return '<p class="empty">No failures.</p>'
    rows = []
    for path, rec in failures:
        suggestions = rec.get("recovery_suggestions") or []
        if not isinstance(suggestions, list):
            suggestions = [suggestions]
        sugg = "<ul>" + "".join(f"<li>{_e(s)}</li>" for s in suggestions) + "</ul>" if suggestions else "—"
        rows.append(
            f'<tr id="failed-{_e(path.stem)}"><td>{_e(rec.get("id") or path.stem)}'
            + (f"<br><small>{_e(rec['file'])}</small>" if rec.get("file") else "")
            + f'</td><td class="cat">{_e(rec.get("error_category", "?"))}</td><td>{_e(rec.get("message", ""))}</td>'
            f"<td>{sugg}</td><td>{_e(rec.get('attempts', '—'))}</td><td>{_e(rec.get('failed_at', ''))}</td></tr>"
        )
    return (
        "<table><thead><tr><th>job</th><th>category</th><th>message</th><th>what to do</th><th>attempts</th>"
        "<th>failed at</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def _charts(done: list[dict[str, Any]]) -> str:
    gen: dict[str, list[float]] = {}
    vram: dict[str, list[float]] = {}
    for sc in done:
        model = str((sc.get("model_used") or {}).get("name") or "?") if isinstance(sc.get("model_used"), dict) else "?"
        t = _num(sc.get("generation_time_seconds"))
        if t is not None:
            gen.setdefault(model, []).append(t)
        v = _num(sc.get("peak_vram_usage_mb"))
        if v is not None:
            vram.setdefault(model, []).append(v)
    gen_rows = [
        (
            m,
            sum(v) / len(v),
            f"mean {_fmt_seconds(sum(v) / len(v))} · max {_fmt_seconds(max(v))} · "
            f"{len(v)} job{'s' if len(v) != 1 else ''}",
        )
        for m, v in sorted(gen.items())
    ]
    vram_rows = [
        (m, max(v), f"max {_fmt_mb(max(v))} · mean {_fmt_mb(sum(v) / len(v))}") for m, v in sorted(vram.items())
    ]
    figures = [f"<figure>{svg_bar_chart('Generation time by model', gen_rows)}</figure>"]
    if vram_rows:
        figures.append(f"<figure>{svg_bar_chart('Peak VRAM by model', vram_rows)}</figure>")
    else:
        figures.append(f"<figure>{svg_bar_chart('Peak VRAM by model (no GPU runs yet)', [])}</figure>")
    return '<div class="charts">' + "".join(figures) + "</div>"


def _sort_key(item: tuple[Path, dict[str, Any]]) -> tuple[str, str]:
    path, sc = item
    ts = _mapping(sc, "timestamps")
    return (str(ts.get("finished_at") or ""), path.name)


def render_report(outbox: Path, output: Path) -> str:
    """The page as a string (posters missing beside the videos are written as a side effect)."""
    outbox = Path(outbox).resolve()
    base = Path(output).resolve().parent
    records, problems = _load_json_records(outbox)
    done = sorted(((p, r) for p, r in records if r.get("status") == "done"), key=_sort_key, reverse=True)
    failures, fail_problems = _load_json_records(outbox / "failed")
    failures.sort(key=lambda item: (str(item[1].get("failed_at") or ""), item[0].name), reverse=True)
    problems += [f"failed/{p}" for p in fail_problems]

    cards = "".join(_card(sc, path, outbox, base) for path, sc in done)
    total_gen = sum(_num(sc.get("generation_time_seconds")) or 0.0 for _p, sc in done)
    summary = (
        f"<b>{len(done)}</b> video{'s' if len(done) != 1 else ''} · <b>{len(failures)}</b> "
        f"failure{'s' if len(failures) != 1 else ''} · {_e(_fmt_seconds(total_gen))} of generation · "
        f"outbox <code>{_e(outbox)}</code> · generated {_e(time.strftime('%Y-%m-%d %H:%M:%S %z'))}"
    )
    problem_html = (
        '<ul class="problems">' + "".join(f"<li>{_e(p)}</li>" for p in problems) + "</ul>" if problems else ""
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{TITLE}</title><style>{_CSS}</style></head><body>"
        f'<header><h1>{TITLE}</h1><p class="summary">{summary}</p></header><main>'
        f"<h2>Charts</h2>{_charts([sc for _p, sc in done])}"
        f"<h2>Videos ({len(done)})</h2>"
        + (f'<div class="cards">{cards}</div>' if cards else '<p class="empty">No finished videos yet.</p>')
        + f"<h2>Failures ({len(failures)})</h2>{_failures_table(failures)}{problem_html}"
        "</main><footer>Static page written by wan-daemon; posters and videos are the files beside it.</footer>"
        "</body></html>\n"
    )


def build_report(outbox: Path, output: Path) -> Path:
    """Write the report for ``outbox`` to ``output`` atomically; returns ``output``."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(output, render_report(outbox, output).encode("utf-8"))
    return output


__all__ = ["TITLE", "build_report", "render_report", "svg_bar_chart", "write_poster"]
