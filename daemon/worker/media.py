"""Frames in, files out: the input image fitted to the job's size, the MP4 encoded and read back as a
player sees it, the poster frame. CPU only; no torch, no diffusers (numpy, Pillow and imageio's ffmpeg,
each imported where it is used).
"""

from __future__ import annotations

import errno
import os
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


def probe_video(path: Path) -> dict[str, Any]:
    """Read an MP4 back: frame count, fps and size as a player sees them, plus bytes and sha256.
    The keys are :class:`~daemon.worker.protocol.VideoFacts`' fields plus ``path`` (:func:`video_facts`).

    One ffmpeg run reads every packet of the video stream (stream copy: a truncated or corrupt container
    fails it; no decoding, which would cost as much again as a fast encode) and prints the stream header on
    the way: both are read from its output."""
    import subprocess

    import imageio_ffmpeg
    from imageio_ffmpeg._parsing import parse_ffmpeg_header

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
    meta = parse_ffmpeg_header(text)
    if frames is None or "size" not in meta:
        raise RuntimeError(f"ffmpeg's output for {path.name} has no frame count or size: {text[-500:]}")
    width, height = meta["size"]
    return {
        "path": str(path),
        "bytes": os.path.getsize(path),
        "sha256": sha256_file(path),
        "frames": frames,
        "fps": float(meta["fps"]),
        "width": int(width),
        "height": int(height),
        "codec": meta.get("codec"),
    }


def video_facts(path: Path) -> VideoFacts:
    """:func:`probe_video` as the typed facts a job's result carries."""
    facts = probe_video(path)
    facts.pop("path")
    return VideoFacts(**facts)


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


def encode_mp4(frames: Any, path: Path, *, fps: int, quality: float) -> None:
    """Encode frames (F, H, W, 3; uint8, or float in [0, 1]) to H.264 MP4 through imageio's ffmpeg writer, as
    diffusers' export_to_video does (same quality scale, sizes padded to 16), without its float copy of
    every frame; fsync it."""
    import imageio

    with imageio.get_writer(str(path), fps=fps, quality=quality, macro_block_size=16) as writer:
        for frame in frames:
            # imageio's stubs type Writer.__enter__ as returning the base class, which lacks append_data.
            writer.append_data(as_uint8(frame))  # type: ignore[attr-defined]
    fsync_file(path)
