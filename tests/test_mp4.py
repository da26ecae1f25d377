"""Player-ready MP4s: H.264 High profile at most (also at the top quality), yuv420p, the index (moov) before
the data (faststart), and the frame count and rate asked for, read back as ffprobe would: the box order from
the file's own box headers, the stream from the bundled ffmpeg's ``-i`` report (no ffprobe binary here)."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest

from daemon.worker import media
from daemon.worker.media import crf_for, encode_mp4, mp4_boxes, parse_stream_header, probe_video, video_facts

# What the bundled ffmpeg printed for one of our videos (n9.0): the format parse_stream_header reads.
FFMPEG_LINE = (
    "  Stream #0:0[0x1](und): Video: h264 (High) (avc1 / 0x31637661), yuv420p(progressive), 64x48, 1035 kb/s, "
    "23.98 fps, 23.98 tbr, 12288 tbn (default)"
)


def _frames(n: int, h: int = 48, w: int = 64) -> np.ndarray:
    rng = np.random.default_rng(n)
    # channels first, then permuted, as the backend hands them over: not C-contiguous
    return rng.integers(0, 256, (n, 3, h, w), dtype=np.uint8).transpose(0, 2, 3, 1)


def _ffmpeg_report(path: Path) -> str:
    done = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    return done.stdout.decode(errors="ignore")


@pytest.mark.parametrize(
    "quality,fps,frames",
    [(10, 120, 5), (0, 1, 1), (0.5, 24, 9), (8, 16, 9), (9.99, 30, 2)],
)
def test_every_video_is_high_profile_yuv420p_faststart_with_its_frames_and_rate(tmp_path, quality, fps, frames):
    path = tmp_path / "v.mp4"
    encode_mp4(_frames(frames), path, fps=fps, quality=quality)
    facts = probe_video(path)
    boxes = facts["boxes"]
    assert boxes[0] == "ftyp" and boxes.index("moov") < boxes.index("mdat"), boxes
    assert (facts["codec"], facts["profile"], facts["pix_fmt"]) == ("h264", "High", "yuv420p")
    assert (facts["frames"], facts["fps"], facts["width"], facts["height"]) == (frames, fps, 64, 48)
    # the same facts from ffmpeg's plain report on the file, decoded independently of the packet count
    assert parse_stream_header(_ffmpeg_report(path))["profile"] == "High"
    decoded = imageio_ffmpeg.read_frames(str(path))
    next(decoded)
    assert sum(1 for _ in decoded) == frames


def test_crf_spans_imageios_scale_and_is_never_lossless():
    assert (crf_for(0), crf_for(0.5), crf_for(8), crf_for(10)) == (51, 48, 10, 1)
    for bad in (-0.1, 10.01):
        with pytest.raises(ValueError):
            crf_for(bad)


def test_the_stream_line_of_ffmpeg_is_read_as_ffprobe_reports_it():
    got = parse_stream_header("Input #0, mov,mp4\n" + FFMPEG_LINE + "\n")
    assert got == {"codec": "h264", "profile": "High", "pix_fmt": "yuv420p", "width": 64, "height": 48, "fps": 23.98}
    lossless = FFMPEG_LINE.replace("(High)", "(High 4:4:4 Predictive)").replace("23.98 fps, ", "")
    assert parse_stream_header(lossless)["profile"] == "High 4:4:4 Predictive"
    assert parse_stream_header(lossless)["fps"] == 23.98  # from tbr when fps is not printed
    with pytest.raises(ValueError, match="no video stream"):
        parse_stream_header("Stream #0:1: Audio: aac, 48000 Hz\n")


def test_the_bundled_ffmpeg_still_prints_what_we_read(tmp_path):
    """Fails loudly when an imageio-ffmpeg upgrade brings an ffmpeg that words its report differently."""
    path = tmp_path / "v.mp4"
    encode_mp4(_frames(3), path, fps=24, quality=8)
    got = parse_stream_header(_ffmpeg_report(path))
    assert (got["codec"], got["width"], got["height"], got["fps"]) == ("h264", 64, 48, 24.0)
    facts = video_facts(path)
    assert (facts.frames, facts.codec) == (3, "h264")


def test_media_uses_no_private_imageio_module():
    tree = ast.parse(Path(media.__file__).read_text())
    names = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [n for n in names if n != "__future__" and any(p.startswith("_") for p in n.split("."))], names


def test_box_reader_follows_64_bit_sizes_and_refuses_broken_boxes(tmp_path):
    path = tmp_path / "b.mp4"
    big = (1).to_bytes(4, "big") + b"mdat" + (24).to_bytes(8, "big") + b"\0" * 8
    path.write_bytes((16).to_bytes(4, "big") + b"ftyp" + b"isom" + b"\0" * 4 + big + (8).to_bytes(4, "big") + b"moov")
    assert mp4_boxes(path) == ["ftyp", "mdat", "moov"]
    path.write_bytes((4).to_bytes(4, "big") + b"ftyp")
    with pytest.raises(ValueError, match="broken MP4 box"):
        mp4_boxes(path)
