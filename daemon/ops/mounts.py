"""Which filesystem a path is on, from /proc/mounts: for the doctor's inbox check (inotify does not see files
that other hosts write to a network share)."""

from __future__ import annotations

import os
from pathlib import Path

# Filesystems on which inotify does not see files written by other hosts.
NETWORK_FS_TYPES = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "fuse.sshfs",
        "9p",
        "ceph",
        "fuse.ceph",
        "glusterfs",
        "fuse.glusterfs",
        "lustre",
        "gpfs",
        "beegfs",
        "fuse.s3fs",
        "fuse.rclone",
        "afs",
        "ocfs2",
        "gfs2",
    }
)


def _unescape_mount(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash in paths as octal escapes (\\040 ...)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1 : i + 4]) == 3 and all(c in "01234567" for c in field[i + 1 : i + 4]):
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def read_mounts() -> str:
    try:
        return Path("/proc/mounts").read_text()
    except OSError:
        return ""


def fs_type(path: Path, mounts_text: str) -> str | None:
    """The filesystem type of ``path`` according to ``mounts_text`` (/proc/mounts format): the entry with the
    longest mount point containing the path (the last one wins among equal mount points, as the kernel
    stacks them). None when nothing matches."""
    target = Path(os.path.abspath(path))
    best: tuple[int, str] | None = None
    for line in mounts_text.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        mount_point, kind = Path(_unescape_mount(parts[1])), parts[2]
        if target == mount_point or mount_point in target.parents:
            depth = len(mount_point.parts)
            if best is None or depth >= best[0]:
                best = (depth, kind)
    return best[1] if best else None
