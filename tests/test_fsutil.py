"""Durable writes, idempotent publishing, and path confinement against hostile inputs."""

from __future__ import annotations

import errno
import json
import os
import threading

import pytest

from daemon.fsutil import TEMP_PREFIX, atomic_copy, atomic_write_json, open_confined, publish, read_json, temp_path_for


def test_atomic_write_leaves_no_temp_and_replaces_whole(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_json(target, {"v": 1})
    atomic_write_json(target, {"v": 2})
    assert read_json(target) == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_readers_never_see_a_partial_file(tmp_path):
    target = tmp_path / "h.json"
    atomic_write_json(target, {"n": 0, "pad": "x" * 100_000})
    stop = threading.Event()
    bad = []

    def reader():
        while not stop.is_set():
            try:
                read_json(target)
            except ValueError as exc:  # a torn read would fail to parse
                bad.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    for n in range(200):
        atomic_write_json(target, {"n": n, "pad": "x" * 100_000})
    stop.set()
    t.join()
    assert not bad


def test_publish_never_replaces_an_existing_file(tmp_path):
    final = tmp_path / "out.json"
    t1 = temp_path_for(final)
    t1.write_text("first")
    assert publish(t1, final) is True
    t2 = temp_path_for(final)
    t2.write_text("second")
    assert publish(t2, final) is False
    assert final.read_text() == "first"
    assert not t1.exists() and not t2.exists()


def test_publish_without_hard_links_never_replaces_either(tmp_path, monkeypatch):
    """SMB or FAT (no link()): the fallback still refuses a name that exists, and removes the temp."""

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    final = tmp_path / "out.mp4"
    t1 = temp_path_for(final)
    t1.write_bytes(b"first")
    assert publish(t1, final) is True
    t2 = temp_path_for(final)
    t2.write_bytes(b"second")
    assert publish(t2, final) is False
    assert final.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]


def test_temp_names_are_hidden_and_beside_the_target(tmp_path):
    t = temp_path_for(tmp_path / "x.mp4")
    assert t.parent == tmp_path and t.name.startswith(TEMP_PREFIX) and t.suffix == ".mp4"


def test_atomic_copy_refuses_to_overwrite(tmp_path):
    src = tmp_path / "src.yaml"
    src.write_text("prompt: a\n")
    dst = tmp_path / "inbox.yaml"
    atomic_copy(src, dst)
    with pytest.raises(FileExistsError):
        atomic_copy(src, dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inbox.yaml", "src.yaml"]


def test_atomic_create_refuses_to_overwrite_and_leaves_no_temp_when_the_link_fails(tmp_path, monkeypatch):
    from daemon import fsutil

    dst = tmp_path / "job.yaml"
    fsutil.atomic_create(dst, b"prompt: a\n")
    with pytest.raises(FileExistsError):
        fsutil.atomic_create(dst, b"prompt: b\n")
    assert dst.read_bytes() == b"prompt: a\n"

    def no_space(tmp, final):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fsutil, "publish", no_space)
    with pytest.raises(OSError):
        fsutil.atomic_create(tmp_path / "other.yaml", b"prompt: c\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]


@pytest.fixture
def roots(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.png").write_bytes(b"png")
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"secret")
    return root, outside


def read(path, root, max_bytes=1000):
    with open_confined(path, [root], max_bytes=max_bytes) as fh:
        return fh.read()


def test_relative_path_under_root_is_read(roots):
    root, _ = roots
    assert read("sub/ok.png", root) == b"png"
    assert read(root / "sub" / "ok.png", root) == b"png"


@pytest.mark.parametrize("path", ["../secret.png", "sub/../../secret.png"])
def test_dotdot_is_refused(roots, path):
    root, _ = roots
    with pytest.raises(ValueError, match=r"'\.\.'"):
        read(path, root)


def test_absolute_path_outside_roots_is_refused(roots):
    root, outside = roots
    with pytest.raises(ValueError, match="not found under the allowed input roots"):
        read(str(outside), root)


def test_symlink_to_outside_is_refused(roots):
    root, outside = roots
    os.symlink(outside, root / "link.png")
    with pytest.raises(ValueError, match="symlink"):
        read("link.png", root)


def test_symlinked_folder_is_refused(roots, tmp_path):
    root, _ = roots
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "a.png").write_bytes(b"x")
    os.symlink(tmp_path / "elsewhere", root / "dir")
    with pytest.raises(ValueError, match="symlink"):
        read("dir/a.png", root)


def test_file_swapped_for_a_symlink_after_the_check_is_refused(roots, monkeypatch):
    """O_NOFOLLOW on the final open: a symlink swapped in between the checks and the open fails."""
    root, outside = roots
    target = root / "race.png"
    target.write_bytes(b"fine")
    real_open = os.open

    def swapping_open(path, flags, *args):
        if str(path).endswith("race.png"):
            os.unlink(target)
            os.symlink(outside, target)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", swapping_open)
    with pytest.raises(ValueError, match="symlink"):
        read("race.png", root)


def test_fifo_and_oversized_files_are_refused(roots):
    root, _ = roots
    os.mkfifo(root / "pipe.png")
    with pytest.raises(ValueError, match="not a regular file"):
        read("pipe.png", root)
    (root / "big.png").write_bytes(b"x" * 2000)
    with pytest.raises(ValueError, match="limit"):
        read("big.png", root)


def test_the_health_snapshot_is_throttled_and_not_fsynced_while_state_changes_are_written_at_once(
    tmp_path, monkeypatch
):
    # Progress changes the health document at every denoising step: writing (and fsyncing) it each time
    # cost the daemon more CPU than anything else it does per job.
    from daemon.runtime.health import HealthWriter

    now = [1000.0]
    fsyncs = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd)))
    writer = HealthWriter(tmp_path / "health.json", interval=10.0, clock=lambda: now[0])
    assert writer.maybe_write({"step": 1})
    now[0] += 0.05
    assert not writer.maybe_write({"step": 2})  # changed, but only 50 ms after the last write
    assert writer.maybe_write({"step": 2, "state": "done"}, force=True)  # a change of state: at once
    now[0] += 0.3
    assert writer.maybe_write({"step": 3})
    assert not writer.maybe_write({"step": 3})  # unchanged
    now[0] += 10
    assert writer.maybe_write({"step": 3})  # the heartbeat
    assert json.loads((tmp_path / "health.json").read_text())["step"] == 3
    assert fsyncs == []
