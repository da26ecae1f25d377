"""``wan-daemon doctor``: checks this machine can run the daemon as configured, and says what to fix.

Each check returns a :class:`Check` (ok / warn / fail) with what it found and, when it is not ok, what
to do. Checks do real work where presence proves little: the video check encodes and reads back a
clip, the write check creates and deletes a file. No check raises: a crash is reported as a failure.
Heavy imports (torch, pynvml, diffusers) happen inside the checks.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from daemon.fsutil import TEMP_PREFIX
from daemon.ops.lease_check import check_lease_grace
from daemon.ops.mounts import NETWORK_FS_TYPES, fs_type, read_mounts

Status = Literal["ok", "warn", "fail"]

_MIB = 1 << 20
_GIB = 1 << 30
MODEL_CACHE_WARN_BYTES = 20 * _GIB  # real Wan2.2 weights take 30-120 GB

SYMBOLS = {"ok": "✓", "warn": "!", "fail": "✗"}


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    advice: str = ""


# --- helpers -----------------------------------------------------------------------------------------------


def _nearest_existing(path: Path) -> Path:
    path = Path(path)
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _human(n: float) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", _GIB), ("MiB", _MIB)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 1024:.1f} KiB"


def _try_write(folder: Path) -> str | None:
    """Create, write, fsync and delete a temp file in ``folder``; None when that worked, else why not."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"no write permission on {folder} (uid {os.geteuid()})"
    try:
        fd, name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}doctor-", dir=folder)
    except OSError as exc:
        return f"cannot create a file in {folder}: {exc.strerror or exc}"
    problem = None
    try:
        os.write(fd, b"wan-daemon doctor\n")
        os.fsync(fd)
    except OSError as exc:
        problem = f"cannot write a file in {folder}: {exc.strerror or exc}"
    finally:
        os.close(fd)
    try:
        os.unlink(name)
    except OSError as exc:
        problem = problem or f"created {name} but cannot delete it: {exc.strerror or exc}"
    return problem


# --- checks ------------------------------------------------------------------------------------------------


def check_python() -> Check:
    v = sys.version_info
    detail = f"Python {platform.python_version()} ({sys.executable})"
    if v >= (3, 10):
        return Check("python", "ok", detail)
    return Check("python", "fail", detail, "wan-daemon needs Python 3.10 or newer.")


def check_torch() -> Check:
    try:
        import torch
    except Exception as exc:
        return Check(
            "torch",
            "fail",
            f"cannot import torch: {exc}",
            "Install torch into this environment (make demo does; see README for the CUDA build).",
        )
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    try:
        available = torch.cuda.is_available()
        count = torch.cuda.device_count() if available else 0
        names = [
            f"{i}: {torch.cuda.get_device_name(i)} ({_human(torch.cuda.get_device_properties(i).total_memory)})"
            for i in range(count)
        ]
    except Exception as exc:
        return Check(
            "torch",
            "fail",
            f"torch {torch.__version__} ({build}), CUDA query failed: {exc}",
            "Check the NVIDIA driver matches the torch CUDA build (nvidia-smi, torch.version.cuda).",
        )
    detail = f"torch {torch.__version__} ({build}), CUDA available: {available}"
    if available:
        return Check("torch", "ok", f"{detail}, {count} device(s): {'; '.join(names)}")
    if torch.version.cuda:
        advice = (
            "This torch is built for CUDA but sees no device: check the driver (nvidia-smi) and "
            "CUDA_VISIBLE_DEVICES. Without a GPU only the tiny test models run."
        )
    else:
        advice = (
            "Only the tiny test models run on a CPU (real models are refused unless "
            "worker.allow_cpu_for_real_models). On a GPU server install a CUDA torch: "
            'make demo TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128" (see README).'
        )
    return Check("torch", "warn", detail, advice)


def check_nvml() -> Check:
    try:
        import pynvml
    except Exception as exc:
        return Check(
            "nvml",
            "warn",
            f"pynvml not importable ({exc})",
            "Install nvidia-ml-py (a dependency of wan-daemon) to see GPUs without importing torch.",
        )
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        return Check(
            "nvml",
            "warn",
            f"NVML unavailable: {exc}",
            "No NVIDIA driver is loaded. That is expected on a CPU-only host (only the tiny test models "
            "run there); on a GPU server install the NVIDIA driver and check `nvidia-smi`.",
        )
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        gpus = []
        for i in range(int(pynvml.nvmlDeviceGetCount())):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(f"{i}: {name} ({_human(mem.used)} used of {_human(mem.total)})")
    except Exception as exc:
        return Check(
            "nvml",
            "fail",
            f"NVML initialised but a query failed: {exc}",
            "Check the driver with `nvidia-smi`; a driver/library version mismatch needs a reboot.",
        )
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    if not gpus:
        return Check(
            "nvml",
            "warn",
            f"driver {driver}, but no GPU visible",
            "Check `nvidia-smi` and that the GPUs are passed into this container/VM.",
        )
    return Check("nvml", "ok", f"driver {driver}, {len(gpus)} GPU(s): {'; '.join(gpus)}")


def check_video_encoding() -> Check:
    try:
        import imageio_ffmpeg
        import numpy as np

        exe = imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as exc:
        return Check(
            "video encoding",
            "fail",
            f"no ffmpeg: {exc}",
            "Install imageio-ffmpeg (a dependency of wan-daemon), or set IMAGEIO_FFMPEG_EXE to an ffmpeg with libx264.",
        )
    if not exe or not os.path.isfile(exe) or not os.access(exe, os.X_OK):
        return Check(
            "video encoding",
            "fail",
            f"ffmpeg {exe!r} is not an executable file",
            "Reinstall imageio-ffmpeg, or set IMAGEIO_FFMPEG_EXE to a working ffmpeg.",
        )
    from daemon.worker.media import encode_mp4, probe_video

    try:
        with tempfile.TemporaryDirectory(prefix="wan-doctor-") as tmp:
            clip = Path(tmp) / "doctor.mp4"
            frames = np.linspace(0.0, 1.0, 2 * 16 * 16 * 3, dtype=np.float32).reshape(2, 16, 16, 3)
            encode_mp4(frames, clip, fps=8, quality=5.0)
            info = probe_video(clip)
    except Exception as exc:
        return Check(
            "video encoding",
            "fail",
            f"ffmpeg {exe} failed to encode a 2-frame 16x16 H.264 clip: {exc}",
            "Every job would fail at the encoding step. Try `"
            f"{exe} -hide_banner -encoders | grep 264` and reinstall imageio-ffmpeg.",
        )
    got = (info["frames"], info["width"], info["height"])
    if got != (2, 16, 16):
        return Check(
            "video encoding",
            "fail",
            f"encoded clip reads back as {got[0]} frames {got[1]}x{got[2]}, expected 2 frames 16x16",
            "The ffmpeg in use is broken; reinstall imageio-ffmpeg.",
        )
    return Check("video encoding", "ok", f"ffmpeg {exe}: encoded and read back a 2-frame 16x16 {info['codec']} clip")


def _hf_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def check_disk(label: str, path: Path, *, min_free_mb: int, warn_bytes: int | None = None) -> Check:
    name = f"disk: {label}"
    existing = _nearest_existing(Path(path))
    try:
        usage = shutil.disk_usage(existing if existing.is_dir() else existing.parent)
    except OSError as exc:
        return Check(name, "fail", f"cannot stat the filesystem of {path}: {exc}", "Check the path and its mount.")
    where = str(path) if existing == Path(path) else f"{path} (not created yet; measured at {existing})"
    detail = f"{_human(usage.free)} free of {_human(usage.total)} at {where}"
    if usage.free < min_free_mb * _MIB:
        return Check(
            name,
            "fail",
            detail,
            f"Less than limits.min_free_mb ({min_free_mb} MiB): the daemon pauses intake and new jobs. "
            "Free space or move this folder to a larger disk.",
        )
    if warn_bytes is not None and usage.free < warn_bytes:
        return Check(
            name,
            "warn",
            detail,
            f"Less than {_human(warn_bytes)}: real Wan2.2 weights take 30-120 GB; downloading one may "
            "not fit. Free space or point this cache at a larger disk.",
        )
    return Check(name, "ok", detail)


def check_writable(label: str, path: Path) -> Check:
    name = f"write: {label}"
    path = Path(path)
    if path.is_dir():
        problem = _try_write(path)
        if problem:
            return Check(
                name,
                "fail",
                problem,
                f"The daemon must create and rename files in {path}: fix its owner or mode "
                "(e.g. chown to the service user) or choose another folder.",
            )
        return Check(name, "ok", f"{path}: created and deleted a file")
    if os.path.lexists(path):
        return Check(
            name, "fail", f"{path} exists but is not a folder", "Remove or rename it, or point the setting at a folder."
        )
    ancestor = _nearest_existing(path)
    if not ancestor.is_dir():
        return Check(
            name,
            "fail",
            f"{path} is missing and cannot be created: {ancestor} is not a folder",
            "Point the setting at a path under a folder, or remove the file in the way.",
        )
    problem = _try_write(ancestor)
    if problem:
        return Check(
            name,
            "fail",
            f"{path} is missing and cannot be created: {problem}",
            f"Create {path} for the service user, or make {ancestor} writable.",
        )
    return Check(
        name,
        "warn",
        f"{path} is missing; it will be created (its parent {ancestor} is writable)",
        "Nothing to do unless this path is a typo.",
    )


def check_models(models_dir: Path, default: str) -> list[Check]:
    from daemon.models import REGISTRY, TINY_FOR, hub_snapshot, tiny_model_dir
    from daemon.worker.tiny import is_built

    checks: list[Check] = []
    present: set[str] = set()
    for info in REGISTRY.values():
        name = f"model: {info.name}"
        if info.tiny:
            folder = tiny_model_dir(models_dir, info.name)
            if is_built(folder):
                checks.append(Check(name, "ok", f"tiny test model built at {folder}"))
                present.add(info.name)
            else:
                checks.append(
                    Check(
                        name,
                        "ok",
                        f"tiny test model not built yet; it is built in {folder} on first use (a few seconds)",
                    )
                )
                present.add(info.name)  # always available
            continue
        assert info.repo_id is not None  # every registry model that is not tiny names its hub repo
        snap = hub_snapshot(info.repo_id)
        if snap:
            present.add(info.name)
            checks.append(Check(name, "ok", f"{info.repo_id} revision {snap[1][:12]} at {snap[0]}"))
        else:
            checks.append(
                Check(
                    name,
                    "warn",
                    f"{info.repo_id} is not in the Hugging Face cache",
                    f"Jobs naming {info.name} fail with model_not_found. To run them: "
                    f"`hf download {info.repo_id}` (30-120 GB). To test without it: model "
                    f"{TINY_FOR[info.architecture]!r}.",
                )
            )
    if default != "auto" and default in REGISTRY and default not in present:
        checks.append(
            Check(
                "model: default",
                "fail",
                f"models.default is {default!r}, which is not here",
                "Every job without a model: line would fail. Download it or set models.default: auto.",
            )
        )
    return checks


def check_inbox_filesystem(inbox: Path, watch_mode: str, mounts_text: str | None) -> Check:
    mounts = read_mounts() if mounts_text is None else mounts_text
    probe = _nearest_existing(Path(inbox)).resolve()  # a symlink into a share counts as the share
    kind = fs_type(probe, mounts)
    if kind is None:
        return Check(
            "inbox filesystem",
            "warn",
            f"cannot tell the filesystem of {inbox} (no /proc/mounts entry)",
            "If the inbox is a network share written by other hosts, set watch.mode: polling.",
        )
    detail = f"{inbox} is on {kind}, watch.mode: {watch_mode}"
    if kind in NETWORK_FS_TYPES:
        if watch_mode == "inotify":
            return Check(
                "inbox filesystem",
                "warn",
                detail,
                f"inotify never sees files written by other hosts on {kind}: set watch.mode: polling "
                "(the periodic rescan still finds them, but only every watch.rescan_interval_seconds).",
            )
        return Check("inbox filesystem", "ok", f"{detail} (network share: polling is right)")
    return Check("inbox filesystem", "ok", detail)


def _guard(name: str, fn: Callable[[], Any]) -> list[Check]:
    try:
        result = fn()
    except Exception as exc:  # a doctor that crashes helps nobody: report it and go on
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        return [
            Check(
                name,
                "fail",
                f"the check itself crashed: {type(exc).__name__}: {exc} ({Path(tb.filename).name}:{tb.lineno})",
                "Please report this.",
            )
        ]
    return result if isinstance(result, list) else [result]


def run_checks(settings, *, mounts_text: str | None = None) -> list[Check]:
    """Run every check for ``settings`` (a resolved :class:`daemon.config.Settings`). ``mounts_text`` replaces
    /proc/mounts (tests)."""
    p, limits = settings.paths, settings.limits
    min_free = limits.min_free_mb
    checks: list[Check] = []
    checks += _guard("python", check_python)
    checks += _guard("torch", check_torch)
    checks += _guard("nvml", check_nvml)
    checks += _guard("video encoding", check_video_encoding)
    checks += _guard("disk: spool", lambda: check_disk("spool", p.state, min_free_mb=min_free))
    checks += _guard("disk: outbox", lambda: check_disk("outbox", p.outbox, min_free_mb=min_free))
    checks += _guard(
        "disk: models", lambda: check_disk("models", p.models, min_free_mb=min_free, warn_bytes=MODEL_CACHE_WARN_BYTES)
    )
    checks += _guard(
        "disk: hf cache",
        lambda: check_disk("hf cache", _hf_cache(), min_free_mb=min_free, warn_bytes=MODEL_CACHE_WARN_BYTES),
    )
    for label, folder in (("inbox", p.inbox), ("outbox", p.outbox), ("state", p.state), ("models", p.models)):
        checks += _guard(f"write: {label}", functools.partial(check_writable, label, folder))
    checks += _guard("models", lambda: check_models(p.models, settings.models.default))
    checks += _guard("inbox filesystem", lambda: check_inbox_filesystem(p.inbox, settings.watch.mode, mounts_text))
    checks += _guard("lease grace", lambda: check_lease_grace(settings))
    return checks


def format_checks(checks: list[Check]) -> str:
    """One line per check (symbol, name, detail); the advice of warnings and failures indented below."""
    width = max((len(c.name) for c in checks), default=0)
    lines = []
    for c in checks:
        lines.append(f"{SYMBOLS.get(c.status, '?')} {c.name:<{width}}  {c.detail}")
        if c.status != "ok" and c.advice:
            lines.extend(f"    {line}" for line in c.advice.splitlines())
    fails = sum(c.status == "fail" for c in checks)
    warns = sum(c.status == "warn" for c in checks)
    lines.append(f"{len(checks)} checks: {fails} failed, {warns} warnings")
    return "\n".join(lines) + "\n"


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.status == "fail" for c in checks) else 0


__all__ = ["Check", "NETWORK_FS_TYPES", "exit_code", "format_checks", "fs_type", "read_mounts", "run_checks"]
