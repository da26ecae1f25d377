"""`wan-daemon doctor` on this machine: the real checks, plus injected mount tables and unusable folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemon.config import load_settings
from daemon.fsutil import TEMP_PREFIX
from daemon.models import REGISTRY
from daemon.ops.doctor import (
    NETWORK_FS_TYPES,
    Check,
    check_disk,
    check_inbox_filesystem,
    check_writable,
    exit_code,
    format_checks,
    fs_type,
    run_checks,
)

LOCAL_MOUNTS = """\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
/dev/sda1 / ext4 rw,relatime 0 0
tmpfs /tmp tmpfs rw,nosuid,nodev 0 0
"""


def nfs_mounts(mount_point: Path, kind: str = "nfs4") -> str:
    escaped = str(mount_point).replace(" ", "\\040")
    return LOCAL_MOUNTS + f"fileserver:/export/jobs {escaped} {kind} rw,relatime,vers=4.2,addr=10.0.0.5 0 0\n"


def settings_for(tmp_path: Path, **paths):
    base = {"inbox": tmp_path / "inbox", "outbox": tmp_path / "outbox", "models": tmp_path / "models"}
    base.update(paths)
    return load_settings(None, {"paths": {k: str(v) for k, v in base.items()}})


def by_name(checks: list[Check]) -> dict[str, Check]:
    names = [c.name for c in checks]
    assert len(names) == len(set(names)), f"duplicate check names: {names}"
    return {c.name: c for c in checks}


@pytest.fixture(scope="module")
def machine_checks(tmp_path_factory) -> tuple[Path, list[Check]]:
    root = tmp_path_factory.mktemp("doctor")
    for d in ("inbox", "outbox", "models"):
        (root / d).mkdir()
    return root, run_checks(settings_for(root))  # the real /proc/mounts


def test_all_checks_present_and_well_formed(machine_checks):
    _root, checks = machine_checks
    checks_by_name = by_name(checks)
    expected = {
        "python",
        "torch",
        "nvml",
        "video encoding",
        "disk: spool",
        "disk: outbox",
        "disk: models",
        "disk: hf cache",
        "write: inbox",
        "write: outbox",
        "write: state",
        "write: models",
        "inbox filesystem",
    } | {f"model: {name}" for name in REGISTRY}
    assert expected <= set(checks_by_name), expected - set(checks_by_name)
    for c in checks:
        assert c.status in ("ok", "warn", "fail"), c
        assert c.detail, c
        if c.status != "ok":
            assert c.advice, f"{c.name} is {c.status} but says nothing about what to do"
        assert "crashed" not in c.detail, c


def test_this_machine(machine_checks):
    root, checks = machine_checks
    c = by_name(checks)
    assert c["python"].status == "ok"
    # Real encoding, not mere presence: the clip was encoded and read back.
    assert c["video encoding"].status == "ok", c["video encoding"]
    assert "read back a 2-frame 16x16" in c["video encoding"].detail
    import torch

    assert torch.__version__ in c["torch"].detail
    assert c["torch"].status == ("ok" if torch.cuda.is_available() else "warn")
    if not torch.cuda.is_available():
        assert "tiny" in c["torch"].advice
    from daemon.ops.inventory import NvmlInventory

    if not NvmlInventory().gpus():
        assert c["nvml"].status == "warn" and "CPU-only host" in c["nvml"].advice
    else:
        assert c["nvml"].status == "ok" and "driver" in c["nvml"].detail
    for label in ("inbox", "outbox", "models"):
        assert c[f"write: {label}"].status == "ok", c[f"write: {label}"]
    # The spool lives in <inbox>/.wan-daemon, which the daemon creates on start.
    assert c["write: state"].status == "warn" and "will be created" in c["write: state"].detail
    assert not (root / "inbox" / ".wan-daemon").exists(), "the doctor must not create folders"
    for d in ("inbox", "outbox", "models"):
        assert not any(p.name.startswith(TEMP_PREFIX) for p in (root / d).iterdir()), "probe files left behind"
    assert c["model: tiny-ti2v-5b"].status == "ok"  # built on first use, so never a problem
    real_kind = fs_type(root / "inbox", Path("/proc/mounts").read_text())
    assert f"is on {real_kind}, watch.mode: inotify" in c["inbox filesystem"].detail
    assert c["inbox filesystem"].status == ("warn" if real_kind in NETWORK_FS_TYPES else "ok")
    text = format_checks(checks)
    assert text.count("\n") >= len(checks)
    assert "✓ python" in text
    assert exit_code(checks) == (1 if any(x.status == "fail" for x in checks) else 0)


def test_unwritable_inbox_under_a_regular_file_fails(tmp_path: Path):
    """A folder that cannot exist (its parent is a regular file). Unlike chmod, this holds for root too."""
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "outbox").mkdir()
    settings = settings_for(tmp_path, inbox=tmp_path / "afile" / "inbox")
    checks = by_name(run_checks(settings, mounts_text=LOCAL_MOUNTS))
    assert checks["write: inbox"].status == "fail"
    assert "afile" in checks["write: inbox"].detail and "not a folder" in checks["write: inbox"].detail
    assert checks["write: state"].status == "fail"  # <inbox>/.wan-daemon cannot be created either
    assert checks["write: outbox"].status == "ok"
    assert checks["write: models"].status == "warn" and "will be created" in checks["write: models"].detail
    assert exit_code(list(checks.values())) == 1
    out = format_checks(list(checks.values()))
    assert "✗ write: inbox" in out


def test_path_that_is_a_file_fails(tmp_path: Path):
    (tmp_path / "outbox").write_text("oops")
    check = check_writable("outbox", tmp_path / "outbox")
    assert check.status == "fail" and "not a folder" in check.detail


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root: chmod 0o500 does not stop root from writing")
def test_read_only_folder_fails(tmp_path: Path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert check_writable("outbox", ro).status == "fail"
        assert check_writable("models", ro / "models").status == "fail"
    finally:
        ro.chmod(0o700)


def test_disk_thresholds(tmp_path: Path):
    free_mb = __import__("shutil").disk_usage(tmp_path).free >> 20
    assert check_disk("spool", tmp_path, min_free_mb=0).status == "ok"
    low = check_disk("spool", tmp_path, min_free_mb=free_mb + 1024)
    assert low.status == "fail" and "min_free_mb" in low.advice
    cache = check_disk("models", tmp_path / "not" / "yet", min_free_mb=0, warn_bytes=(free_mb + 1024) << 20)
    assert cache.status == "warn" and "30-120 GB" in cache.advice and "not created yet" in cache.detail


def test_fs_type_longest_mount_point_wins(tmp_path: Path):
    mounts = nfs_mounts(Path("/srv/shared jobs"))
    assert fs_type(Path("/srv/shared jobs/inbox"), mounts) == "nfs4"
    assert fs_type(Path("/srv/shared jobs"), mounts) == "nfs4"
    assert fs_type(Path("/srv/shared jobsX/inbox"), mounts) == "ext4", "prefix of a name is not a parent"
    assert fs_type(Path("/tmp/x"), mounts) == "tmpfs"
    assert fs_type(Path("/home/u"), mounts) == "ext4"
    assert fs_type(Path("/x"), "") is None
    # Mounted twice on the same point: the later (top) one is what the path sees.
    assert fs_type(Path("/srv/shared jobs/a"), mounts + "//nas/jobs /srv/shared\\040jobs cifs rw 0 0\n") == "cifs"


@pytest.mark.parametrize("kind", ["nfs", "nfs4", "cifs", "smb3", "fuse.sshfs"])
def test_network_inbox_with_inotify_warns(tmp_path: Path, kind: str):
    inbox = tmp_path / "share" / "inbox"
    inbox.mkdir(parents=True)
    mounts = nfs_mounts(tmp_path / "share", kind)
    check = check_inbox_filesystem(inbox, "inotify", mounts)
    assert check.status == "warn" and kind in check.detail
    assert "watch.mode: polling" in check.advice and "other hosts" in check.advice
    assert check_inbox_filesystem(inbox, "polling", mounts).status == "ok"
    # Through run_checks, with the mount table injected.
    settings = settings_for(tmp_path, inbox=inbox)
    assert by_name(run_checks(settings, mounts_text=mounts))["inbox filesystem"].status == "warn"


def test_local_inbox_with_inotify_is_fine(tmp_path: Path):
    assert check_inbox_filesystem(tmp_path, "inotify", nfs_mounts(Path("/elsewhere"))).status == "ok"


def test_missing_inbox_is_judged_by_its_existing_parent(tmp_path: Path):
    mounts = nfs_mounts(tmp_path)
    assert check_inbox_filesystem(tmp_path / "not" / "yet", "inotify", mounts).status == "warn"


def test_default_model_not_present_fails(tmp_path: Path):
    settings = load_settings(
        None,
        {
            "paths": {"inbox": str(tmp_path / "i"), "outbox": str(tmp_path / "o"), "models": str(tmp_path / "m")},
            "models": {"default": "wan2.2-t2v-a14b"},
        },
    )
    from daemon.models import hub_snapshot

    if hub_snapshot(REGISTRY["wan2.2-t2v-a14b"].repo_id) is not None:
        pytest.skip("the real T2V-A14B weights are in this machine's Hugging Face cache")
    from daemon.ops.doctor import check_models

    checks = by_name(check_models(settings.paths.models, settings.models.default))
    assert checks["model: default"].status == "fail"
    assert (
        checks["model: wan2.2-t2v-a14b"].status == "warn" and "hf download" in checks["model: wan2.2-t2v-a14b"].advice
    )


def test_a_crashing_check_is_reported_not_raised(tmp_path: Path, monkeypatch):
    import daemon.ops.doctor as doctor

    def boom():
        raise RuntimeError("kaboom")

    monkeypatch.setattr(doctor, "check_nvml", boom)
    checks = by_name(run_checks(settings_for(tmp_path), mounts_text=LOCAL_MOUNTS))
    assert checks["nvml"].status == "fail" and "kaboom" in checks["nvml"].detail


def test_format_and_exit_code():
    checks = [
        Check("a", "ok", "fine"),
        Check("b", "warn", "hmm", "do this\nthen that"),
        Check("c", "fail", "bad", "fix"),
    ]
    text = format_checks(checks)
    lines = text.splitlines()
    assert lines[0].startswith("✓ a") and lines[1].startswith("! b") and lines[4].startswith("✗ c")
    assert lines[2] == "    do this" and lines[3] == "    then that" and lines[5] == "    fix"
    assert "3 checks: 1 failed, 1 warnings" in text
    assert exit_code(checks) == 1
    assert exit_code(checks[:2]) == 0
    assert exit_code([]) == 0


class FakeNVML:
    """The part of nvidia-ml-py's pynvml the doctor and metrics use (no GPU on the CI machines)."""

    class Mem:
        def __init__(self, total: int, used: int) -> None:
            self.total, self.used, self.free = total, used, total - used

    def __init__(self, names: list, driver="570.124.06") -> None:
        self.names, self.driver, self.shutdowns = names, driver, 0

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self):
        return self.driver

    def nvmlDeviceGetCount(self):
        return len(self.names)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, handle):
        return self.names[handle]

    def nvmlDeviceGetMemoryInfo(self, handle):
        return self.Mem(80 << 30, (handle + 1) << 30)


def test_nvml_with_gpus(monkeypatch):
    import sys

    from daemon.ops.doctor import check_nvml
    from daemon.runtime.metrics import read_gpus

    fake = FakeNVML(["NVIDIA H100 80GB HBM3", b"NVIDIA H100 80GB HBM3"], driver=b"570.124.06")  # old pynvml: bytes
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    check = check_nvml()
    assert check.status == "ok", check
    assert (
        "driver 570.124.06, 2 GPU(s)" in check.detail
        and "1: NVIDIA H100 80GB HBM3 (2.0 GiB used of 80.0 GiB)" in check.detail
    )
    assert read_gpus() == [
        {"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_total_mb": 81920.0, "memory_used_mb": 1024.0},
        {"index": 1, "name": "NVIDIA H100 80GB HBM3", "memory_total_mb": 81920.0, "memory_used_mb": 2048.0},
    ]
    assert fake.shutdowns == 2
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML([]))
    assert check_nvml().status == "warn"
