"""daemon/notify.py against real datagram sockets, and the systemd units through ``systemd-analyze verify``."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import pytest
from loguru import logger

from daemon.runtime.notify import SystemdNotifier

UNITS_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNITS = ("wan-daemon.service", "wan-daemon@.service")


@pytest.fixture
def warnings_logged():
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(m.record["message"]), level="WARNING", format="{message}")
    yield messages
    logger.remove(sink)


def _bound(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(1.0)
    return sock


@pytest.fixture(params=["filesystem", "abstract"])
def listener(request, tmp_path):
    """(NOTIFY_SOCKET value, bound receiving socket)."""
    if request.param == "filesystem":
        path = str(tmp_path / "notify.sock")
        sock = _bound(path)
        yield path, sock
    else:
        name = f"wan-test-{uuid.uuid4().hex}"
        sock = _bound("\0" + name)
        yield "@" + name, sock
    sock.close()


@pytest.mark.parametrize(
    "call, expected",
    [
        (lambda n: n.ready(), b"READY=1"),
        (lambda n: n.ready("idle, 0 queued"), b"READY=1\nSTATUS=idle, 0 queued"),
        (lambda n: n.status("running job demo"), b"STATUS=running job demo"),
        (lambda n: n.status("two\nlines"), b"STATUS=two lines"),  # a newline would start a new field
        (lambda n: n.stopping(), b"STOPPING=1"),
        (lambda n: n.watchdog(), b"WATCHDOG=1"),
        (lambda n: n.extend_timeout(45), b"EXTEND_TIMEOUT_USEC=45000000"),
        (lambda n: n.extend_timeout(0.57), b"EXTEND_TIMEOUT_USEC=570000"),  # not 569999: rounded
        (lambda n: n.send("STATUS=ünïcode", "MAINPID=42"), "STATUS=ünïcode\nMAINPID=42".encode()),
    ],
    ids=["ready", "ready+status", "status", "status-newline", "stopping", "watchdog", "extend", "extend-frac", "send"],
)
def test_exact_datagrams(listener, call, expected, warnings_logged):
    address, sock = listener
    notifier = SystemdNotifier(address)
    assert notifier.enabled
    assert call(notifier) is True
    assert sock.recv(4096) == expected
    assert warnings_logged == []


def test_each_message_is_one_datagram(listener):
    address, sock = listener
    notifier = SystemdNotifier(address)
    assert notifier.ready() and notifier.watchdog() and notifier.stopping()
    assert [sock.recv(4096) for _ in range(3)] == [b"READY=1", b"WATCHDOG=1", b"STOPPING=1"]


@pytest.mark.parametrize("socket_path", [None, ""])
def test_no_socket_is_a_no_op(socket_path, warnings_logged):
    notifier = SystemdNotifier(socket_path, watchdog_usec="10000000")
    assert not notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.status("x") is False
    assert notifier.stopping() is False
    assert notifier.watchdog() is False
    assert notifier.extend_timeout(10) is False
    assert notifier.send("READY=1") is False
    assert notifier.watchdog_interval is None
    assert notifier.watchdog_due(0.0) is False
    assert notifier.maybe_watchdog(0.0) is False
    assert warnings_logged == []


@pytest.mark.parametrize("usec, interval", [("10000000", 5.0), (10_000_000, 5.0), ("60000000", 30.0), ("1", 0.0000005)])
def test_watchdog_interval_is_half_of_watchdog_usec(usec, interval):
    assert SystemdNotifier("/run/notify", watchdog_usec=usec).watchdog_interval == pytest.approx(interval)


@pytest.mark.parametrize("usec", [None, "", "0", "-5", "abc", "1.5e6"])
def test_watchdog_interval_unset_or_invalid(usec, warnings_logged):
    notifier = SystemdNotifier("/run/notify", watchdog_usec=usec)
    assert notifier.watchdog_interval is None
    assert notifier.watchdog_due(1000.0) is False
    assert notifier.maybe_watchdog(1000.0) is False
    # Set but unusable is worth a warning; not set is normal (no WatchdogSec=).
    assert len(warnings_logged) == (0 if usec in (None, "") else 1)


def test_maybe_watchdog_rate_limits(listener):
    address, sock = listener
    notifier = SystemdNotifier(address, watchdog_usec="10000000")  # ping every 5 s
    sent_at = []
    for now in (100.0, 100.1, 102.0, 104.999, 105.0, 105.2, 109.9, 110.0, 200.0):
        due = notifier.watchdog_due(now)
        sent = notifier.maybe_watchdog(now)
        assert sent == due
        if sent:
            sent_at.append(now)
    assert sent_at == [100.0, 105.0, 110.0, 200.0]
    assert [sock.recv(4096) for _ in sent_at] == [b"WATCHDOG=1"] * 4
    sock.settimeout(0)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)


def test_nobody_listening_returns_false_and_warns_once(tmp_path, warnings_logged):
    for address in (str(tmp_path / "missing.sock"), f"@wan-test-{uuid.uuid4().hex}-nobody", "relative.sock"):
        warnings_logged.clear()
        notifier = SystemdNotifier(address, watchdog_usec="2000000")
        assert notifier.ready("x") is False
        assert notifier.watchdog() is False
        assert notifier.maybe_watchdog(0.0) is False
        assert notifier.maybe_watchdog(0.5) is False  # not due: the failed ping is not retried each tick
        assert len(warnings_logged) == 1, (address, warnings_logged)
        assert "notify.failed" in warnings_logged[0]


def test_warns_again_after_recovery(tmp_path, warnings_logged):
    path = tmp_path / "notify.sock"
    notifier = SystemdNotifier(str(path))
    assert notifier.status("a") is False
    sock = _bound(str(path))
    try:
        assert notifier.status("b") is True
        assert sock.recv(4096) == b"STATUS=b"
    finally:
        sock.close()
    # The socket file is still there, nobody is bound to it: ECONNREFUSED.
    assert notifier.status("c") is False
    assert len(warnings_logged) == 2


# ---- start-up: a long recovery before READY=1 --------------------------------------------------------


@pytest.mark.slow  # starts the daemon's worker process
def test_a_recovery_extends_the_start_timeout_and_says_recovering_before_ready(tmp_path):
    """A restart with a big spool: while the records are read, systemd hears EXTEND_TIMEOUT_USEC and
    STATUS=recovering n/N (so TimeoutStartSec= does not kill the daemon mid-recovery), then READY=1."""
    import multiprocessing

    from conftest import fast_settings, wait_for

    from daemon.runtime.daemon import Daemon

    settings = fast_settings(tmp_path, tmp_path / "models", instance={"id": "restarted"})
    earlier = Daemon(settings, backend="daemon.testing:CueBackend")  # the run before the restart
    jobs = 40
    for n in range(jobs):
        job = settings.paths.inbox / f"j{n}.yaml"
        job.write_text("prompt: sleep=0\n")
        earlier.claims.take_in(earlier.spool.claim(job))
    if earlier.history is not None:
        earlier.history.close()

    address = str(tmp_path / "notify.sock")
    sock = _bound(address)
    daemon = Daemon(settings, backend="daemon.testing:CueBackend", notifier=SystemdNotifier(address))
    try:
        daemon.start()
        received = []
        while not received or not received[-1].startswith(b"READY=1"):
            received.append(sock.recv(4096))
    finally:
        daemon.shutdown()
        sock.close()
    wait_for(lambda: not multiprocessing.active_children(), 15, what="the worker to exit")
    fields = [f.decode() for datagram in received for f in datagram.split(b"\n")]
    ready = fields.index("READY=1")
    extend = next((i for i, f in enumerate(fields) if f.startswith("EXTEND_TIMEOUT_USEC=")), None)
    recovering = next((i for i, f in enumerate(fields) if f.startswith(f"STATUS=recovering 1/{jobs}")), None)
    assert extend is not None and recovering is not None, fields
    assert extend < ready and recovering < ready, fields
    assert int(fields[extend].partition("=")[2]) >= 30_000_000  # a margin, not a tick
    assert len(daemon.records) == jobs


# ---- the systemd units -------------------------------------------------------------------------------

SYNTAX_WORDS = (
    "Unknown key",
    "Unknown section",
    "Unknown lvalue",
    "Invalid",
    "Failed to parse",
    "not absolute",
    "bad unit file setting",
    "Missing '='",
    "is deprecated",
    "Refusing",
)


def unit_syntax_problems(unit: Path) -> list[str]:
    """Run ``systemd-analyze verify`` on a unit file and keep the complaints about the unit's own text.

    On a machine without the daemon installed it also prints lines that say nothing about the unit file
    (``Command /opt/wan-daemon/.venv/bin/wan-daemon is not executable``, a missing user, other units), and
    exits 1 for them; those are ignored. Syntax complaints carry ``<path>:<line>:`` or name the unit."""
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=unit.parent,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )
    stem = unit.name.split("@")[0]  # a template is verified as an instance: "wan-daemon@i.service"
    problems = []
    for line in (result.stdout + result.stderr).splitlines():
        if re.match(re.escape(str(unit)) + r":\d+:", line):
            problems.append(line)
        elif stem in line and any(word in line for word in SYNTAX_WORDS):
            problems.append(line)
    return problems


needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (no systemd on this machine)"
)


@needs_systemd_analyze
@pytest.mark.parametrize("name", UNITS)
def test_unit_file_has_no_syntax_errors(name, tmp_path):
    unit = tmp_path / name
    shutil.copyfile(UNITS_DIR / name, unit)
    assert unit_syntax_problems(unit) == []


@needs_systemd_analyze
@pytest.mark.parametrize(
    "typo",
    [("Restart=on-failure", "Restrat=on-failure"), ("WatchdogSec=60", "WatchdogSec=6o"), ("[Install]", "[Instal]")],
)
def test_unit_check_catches_typos(typo, tmp_path):
    """The check above is not vacuous: a misspelt key, a bad value or section is reported."""
    for name in UNITS:
        text = (UNITS_DIR / name).read_text()
        assert typo[0] in text
        unit = tmp_path / name
        unit.write_text(text.replace(typo[0], typo[1], 1))
        assert unit_syntax_problems(unit), f"{typo[1]!r} in {name} went unnoticed"


@pytest.mark.parametrize("name", UNITS)
def test_units_use_notify_and_watchdog(name):
    """What daemon/notify.py is for: the units must ask for it (readable without systemd-analyze too)."""
    lines = {line.strip() for line in (UNITS_DIR / name).read_text().splitlines()}
    for expected in (
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=60",
        "KillMode=mixed",
        "TimeoutStopSec=90",
        "Restart=on-failure",
        "ExecStart=/opt/wan-daemon/.venv/bin/wan-daemon run",
    ):
        assert expected in lines, expected
    assert "PrivateDevices=yes" not in lines  # it would hide /dev/nvidia*


def exposure(unit: Path) -> float:
    """The overall exposure ``systemd-analyze security --offline=yes`` gives a unit file (0 safe, 10 exposed)."""
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=unit.parent,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_COLORS": "0"},
    )
    found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout + result.stderr)
    assert found, result.stdout + result.stderr
    return float(found.group(1))


@needs_systemd_analyze
@pytest.mark.parametrize("name", UNITS)
def test_units_are_hardened_to_an_exposure_of_at_most_2(name, tmp_path):
    unit = tmp_path / name
    shutil.copyfile(UNITS_DIR / name, unit)
    assert exposure(unit) <= 2.0


@needs_systemd_analyze
def test_the_exposure_check_sees_a_unit_without_its_hardening(tmp_path):
    """Not vacuous: the same unit with its hardening lines removed scores as exposed."""
    text = (UNITS_DIR / "wan-daemon.service").read_text()
    start, end = text.index("NoNewPrivileges=yes"), text.index("[Install]")
    unit = tmp_path / "wan-daemon.service"
    unit.write_text(text[:start] + text[end:])
    assert exposure(unit) > 5.0


@pytest.mark.parametrize("name", UNITS)
def test_units_let_systemd_make_their_folders_and_reload_with_sighup(name):
    lines = {line.strip() for line in (UNITS_DIR / name).read_text().splitlines()}
    for expected in (
        "StateDirectory=wan-daemon",
        "CacheDirectory=wan-daemon",
        "LogsDirectory=wan-daemon",
        "WorkingDirectory=%S/wan-daemon",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "DevicePolicy=closed",
        "DeviceAllow=/dev/nvidiactl rw",
        "DeviceAllow=char-nvidia-frontend rw",
    ):
        assert expected in lines, expected
    assert not any(line.startswith("ReadWritePaths=") and "/var/lib/wan-daemon" in line for line in lines)
    assert "MemoryDenyWriteExecute=yes" not in lines  # the CUDA driver and oneDNN JIT-compile kernels
