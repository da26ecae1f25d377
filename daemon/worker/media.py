"""Frames in, files out: the input image fitted to the job's size, the MP4 encoded and read back as a
player sees it, the poster frame. CPU only; no torch, no diffusers (numpy, Pillow and imageio's ffmpeg,
each imported where it is used).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
from pathlib import Path
from typing import Any

from daemon.fsutil import fsync_file, probe_write, sha256_file
from daemon.worker.protocol import VideoFacts


def fit_image(image: Any, width: int, height: int) -> Any:
    """Resize and centre-crop an input image to exactly width x height, keeping its aspect: scale so that
    it covers the target (the smaller scale that fills both sides), then cut the overflow equally from both
    edges. Nothing is stretched and no border is added."""
    from PIL import Image

    iw, ih = image.size
    scale = max(width / iw, height / ih)
    rw, rh = max(width, round(iw * scale)), max(height, round(ih * scale))
    resized = image.resize((rw, rh), Image.Resampling.LANCZOS)
    left, top = (rw - width) // 2, (rh - height) // 2
    return resized.crop((left, top, left + width, top + height))


_STREAM_RE = re.compile(
    r"Stream #\d+:\d+\S*: Video: (?P<codec>\w+)(?: \((?P<profile>[^)]*)\))?(?: \([^)]*\))*, "
    r"(?P<pix_fmt>\w+)(?:\([^)]*\))?, (?P<width>\d+)x(?P<height>\d+)"
)
_RATE_RE = re.compile(r", (?P<rate>[\d.]+)(?P<k>k?) (?P<unit>fps|tbr)\b")


def parse_stream_header(text: str) -> dict[str, Any]:
    """The first video stream of ``ffmpeg -i`` output (what ffprobe would report): codec, profile, pix_fmt,
    width, height, fps. Raises ValueError when the text has none. Ours, not imageio_ffmpeg's private
    ``_parsing`` module, so that a change of ffmpeg's wording fails here, in a test, and not in a job."""
    for line in text.splitlines():
        m = _STREAM_RE.search(line)
        if m is None:
            continue
        rates = {r["unit"]: float(r["rate"]) * (1000 if r["k"] else 1) for r in _RATE_RE.finditer(line)}
        fps = rates.get("fps", rates.get("tbr"))
        if fps is None:
            raise ValueError(f"no frame rate in ffmpeg's stream line: {line.strip()}")
        return {
            "codec": m["codec"],
            "profile": m["profile"],
            "pix_fmt": m["pix_fmt"],
            "width": int(m["width"]),
            "height": int(m["height"]),
            "fps": fps,
        }
    raise ValueError("ffmpeg's output has no video stream line")


def mp4_boxes(path: Path) -> list[str]:
    """The top-level boxes of an MP4 in file order (``ftyp``, ``moov``, ``mdat``, ...): read from the box
    headers, as a player does; ``moov`` before ``mdat`` is "faststart"."""
    boxes = []
    size_of = os.path.getsize(path)
    with open(path, "rb") as fh:
        offset = 0
        while offset + 8 <= size_of:
            fh.seek(offset)
            header = fh.read(8)
            size, kind = int.from_bytes(header[:4], "big"), header[4:8].decode("latin-1")
            if size == 1:
                size = int.from_bytes(fh.read(8), "big")
            elif size == 0:
                size = size_of - offset
            if size < 8:
                raise ValueError(f"{path.name}: broken MP4 box {kind!r} at byte {offset}")
            boxes.append(kind)
            offset += size
    return boxes


def probe_video(path: Path) -> dict[str, Any]:
    """Read an MP4 back: frame count, fps and size as a player sees them, plus bytes and sha256, the H.264
    profile, the pixel format and the top-level box order. The keys are :class:`VideoFacts`' fields plus
    ``path``, ``profile``, ``pix_fmt`` and ``boxes`` (:func:`video_facts` keeps the first).

    One ffmpeg run reads every packet of the video stream (stream copy: a truncated or corrupt container
    fails it; no decoding, which would cost as much again as a fast encode) and prints the stream header on
    the way: both are read from its output."""
    import subprocess

    import imageio_ffmpeg

    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-hide_banner",
        "-nostdin",
        "-i",
        str(path),
        "-map",
        "0:v:0",
        "-c",
        "copy",
        "-f",
        "null",
        "-",
    ]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    text = done.stdout.decode(errors="ignore")
    if done.returncode != 0:
        raise RuntimeError(f"ffmpeg could not read {path.name} back (exit {done.returncode}): {text[-500:]}")
    frames = None
    for line in reversed(text.splitlines()):
        if line.lstrip().startswith("frame="):
            frames = int(line.split("frame=", 1)[1].split()[0])
            break
    try:
        stream = parse_stream_header(text)
    except ValueError as exc:
        raise RuntimeError(f"ffmpeg's output for {path.name}: {exc}: {text[-500:]}") from None
    if frames is None:
        raise RuntimeError(f"ffmpeg's output for {path.name} has no frame count: {text[-500:]}")
    return {
        "path": str(path),
        "bytes": os.path.getsize(path),
        "sha256": sha256_file(path),
        "frames": frames,
        **stream,
        "boxes": mp4_boxes(path),
    }


def video_facts(path: Path) -> VideoFacts:
    """:func:`probe_video` as the typed facts a job's result carries."""
    facts = probe_video(path)
    return VideoFacts(**{f.name: facts[f.name] for f in dataclasses.fields(VideoFacts)})


def raise_if_disk_full(folder: Path, cause: BaseException) -> None:
    """ffmpeg reports a full disk only on its stderr ("Error writing trailer"), and imageio then fails
    later with an unrelated message: find out by trying to write, so the job is retried, not failed."""
    exc = probe_write(folder)
    if exc is not None and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise OSError(exc.errno, f"no space left in {folder} while encoding ({cause})") from cause


def as_uint8(frame: Any) -> Any:
    """One frame as uint8 RGB: uint8 frames pass through, float frames in [0, 1] are rounded."""
    import numpy as np

    if frame.dtype == np.uint8:
        return frame
    return (np.clip(frame, 0, 1) * 255).round().astype(np.uint8)


def write_poster_frame(frames: Any, path: Path, *, at: float = 0.5, quality: int = 85) -> None:
    """Save the middle frame (uint8, or float in [0, 1]; H x W x 3) as a JPEG, fsynced: the poster."""
    from PIL import Image

    frame = frames[min(len(frames) - 1, int(len(frames) * at))]
    Image.fromarray(as_uint8(frame)).save(path, "JPEG", quality=quality)
    fsync_file(path)


def crf_for(quality: float) -> int:
    """x264's constant rate factor for a job's ``output.quality`` (0-10): imageio's scale (as diffusers'
    export_to_video), CRF 51 at 0 up to CRF 1 at 10. Never 0: CRF 0 is lossless, which x264 encodes in the
    High 4:4:4 Predictive profile that many hardware and Apple decoders refuse."""
    if not 0 <= quality <= 10:
        raise ValueError(f"quality {quality} is outside 0..10")
    return max(1, int((1 - quality / 10.0) * 51))


#: What every MP4 is: H.264 High profile at most, 4:2:0, the index (moov) before the data for web players.
H264_PARAMS = ["-profile:v", "high", "-movflags", "+faststart"]


def encode_mp4(frames: Any, path: Path, *, fps: int, quality: float) -> None:
    """Encode frames (F, H, W, 3; uint8, or float in [0, 1]) to a player-ready H.264 MP4 (High profile,
    yuv420p, faststart) through imageio-ffmpeg's public ``write_frames``, sizes padded to 16 as diffusers'
    export_to_video does, without its float copy of every frame; fsync it."""
    import imageio_ffmpeg
    import numpy as np

    first = as_uint8(frames[0])
    height, width = first.shape[:2]
    writer = imageio_ffmpeg.write_frames(
        str(path),
        (width, height),
        pix_fmt_in="rgb24",
        pix_fmt_out="yuv420p",
        fps=fps,
        codec="libx264",
        quality=None,  # the rate is ours: crf_for
        macro_block_size=16,
        ffmpeg_log_level="error",
        output_params=["-crf", str(crf_for(quality)), *H264_PARAMS],
    )
    writer.send(None)
    try:
        for frame in frames:
            writer.send(np.ascontiguousarray(as_uint8(frame)))  # decoded frames arrive as a permuted view
    finally:
        writer.close()
    fsync_file(path)


# ---- provenance: what made the file (for the sidecar) ----------------------------------------------


def ffmpeg_versions() -> dict[str, str]:
    """The encoder's versions, for the sidecar."""
    import imageio_ffmpeg

    return {"imageio_ffmpeg": imageio_ffmpeg.__version__, "ffmpeg": imageio_ffmpeg.get_ffmpeg_version()}


def pipeline_provenance(pipe: Any, fp8: bool) -> dict[str, Any]:
    """What ran, for the sidecar: the pipeline class, each component's compute dtype (and FP8 storage), the
    scheduler's class and its full configuration (flow_shift as this job set it)."""
    dtypes = {
        name: str(module.dtype).removeprefix("torch.")
        for name, module in pipe.components.items()
        if module is not None and hasattr(module, "dtype")
    }
    if fp8:  # layerwise casting: weights stored in FP8, computed in bf16
        for name in ("transformer", "transformer_2"):
            if name in dtypes:
                dtypes[name] = "bfloat16 (float8_e4m3fn storage)"
    config = {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}
    return {
        "class": type(pipe).__name__,
        "compute_dtypes": dtypes,
        "scheduler": {"class": type(pipe.scheduler).__name__, "config": config},
    }
