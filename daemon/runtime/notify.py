"""A small, self-contained client for systemd's notification protocol (``sd_notify(3)``).

Under ``Type=notify`` systemd passes the service a datagram socket in ``NOTIFY_SOCKET``. The service
sends newline-separated ``KEY=VALUE`` fields to it, each datagram on its own:

* ``READY=1``: start-up is finished (systemd holds ``systemctl start`` and ordered units until then);
* ``STATUS=...``: one line of free text shown by ``systemctl status``;
* ``STOPPING=1``: the service has begun shutting down;
* ``WATCHDOG=1``: the keep-alive ping. With ``WatchdogSec=`` set, systemd passes ``WATCHDOG_USEC`` and
  kills (then, with ``Restart=on-failure``, restarts) a service that has not pinged within that time. The
  daemon pings from its main loop on purpose, so a hung loop is what gets caught, not just a live process;
* ``EXTEND_TIMEOUT_USEC=...``: ask for more time than ``TimeoutStartSec=``/``TimeoutStopSec=`` allow,
  counted from now. The daemon sends it while it recovers a spool at start-up (every few seconds, each
  time for a margin ahead, with ``STATUS=recovering n/N``; READY=1 comes after: daemon.runtime.recovery),
  and while draining a running job. It is not sent once READY=1 is out: with ``RuntimeMaxSec=`` it
  would extend the run time.

An address beginning with ``/`` is a filesystem socket; one beginning with ``@`` is in Linux's abstract
namespace (``"\\0"`` + the rest). This follows systemd's ``man/notify-selfcontained-example.py``: a fresh
``AF_UNIX``/``SOCK_DGRAM`` socket per message, ``connect`` and ``sendall``.

Why built in rather than the ``sdnotify`` package: ``sdnotify`` swallows every error, so a wrong socket
path or a dead systemd is invisible until the watchdog kills the service. Here a failed send logs a
warning (once per run of failures, again after a send succeeds) and returns False; it never raises into
the daemon's loop. Nothing in this module reads the environment: the CLI passes ``NOTIFY_SOCKET`` and
``WATCHDOG_USEC`` in. Without a socket path every method is a no-op that returns False.
"""

from __future__ import annotations

import socket

from loguru import logger

# A datagram to PID 1 is normally accepted at once; this only bounds a pathological full queue, so that
# the daemon's loop can never hang on a notification.
SEND_TIMEOUT_SECONDS = 2.0


class SystemdNotifier:
    def __init__(self, socket_path: str | None, watchdog_usec: str | int | None = None) -> None:
        self.socket_path = socket_path or None
        self._watchdog_interval = _parse_watchdog_interval(watchdog_usec) if self.socket_path else None
        self._last_watchdog: float | None = None
        self._failing = False

    def __repr__(self) -> str:
        return f"SystemdNotifier(socket_path={self.socket_path!r}, watchdog_interval={self._watchdog_interval!r})"

    @property
    def enabled(self) -> bool:
        """True when there is a socket to notify (the daemon runs under ``Type=notify``)."""
        return self.socket_path is not None

    # ---- messages ------------------------------------------------------------------------------

    def send(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields in one datagram (joined with newlines). True when sent."""
        if self.socket_path is None:
            return False
        if not fields:
            logger.warning("notify.failed: nothing to send")
            return False
        message = "\n".join(fields).encode("utf-8")
        try:
            address = _address(self.socket_path)
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(SEND_TIMEOUT_SECONDS)
                sock.connect(address)
                sock.sendall(message)
        except (OSError, ValueError) as exc:  # ValueError: e.g. a NUL byte in a filesystem path
            if not self._failing:
                self._failing = True
                logger.warning(
                    "notify.failed socket={} message={!r} error={}; further failures are not logged "
                    "until a notification gets through",
                    self.socket_path,
                    fields[0],
                    exc,
                )
            return False
        if self._failing:
            self._failing = False
            logger.info("notify.recovered socket={}", self.socket_path)
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``, with ``STATUS=`` when given."""
        if status is None:
            return self.send("READY=1")
        return self.send("READY=1", "STATUS=" + _one_line(status))

    def status(self, text: str) -> bool:
        return self.send("STATUS=" + _one_line(text))

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC=``: the start/stop timeout is extended to ``seconds`` from now."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1_000_000))}")

    # ---- watchdog ------------------------------------------------------------------------------

    @property
    def watchdog_interval(self) -> float | None:
        """How often to ping, in seconds: half of ``WATCHDOG_USEC`` (as ``sd_watchdog_enabled(3)`` advises);
        None without a watchdog (or without a socket)."""
        return self._watchdog_interval

    def watchdog_due(self, now: float) -> bool:
        """True when a ping is due at ``now`` (any monotonic clock, the same one on every call)."""
        if self._watchdog_interval is None:
            return False
        return self._last_watchdog is None or now - self._last_watchdog >= self._watchdog_interval

    def maybe_watchdog(self, now: float) -> bool:
        """Ping if due; called on every tick of the main loop. True when a ping was sent. A failed ping is
        not retried before the next interval either (its warning is already logged)."""
        if not self.watchdog_due(now):
            return False
        self._last_watchdog = now
        return self.watchdog()


def _address(path: str) -> str:
    if path.startswith("@"):
        return "\0" + path[1:]
    if path.startswith("/"):
        return path
    raise OSError(f"unsupported NOTIFY_SOCKET address {path!r} (expected /path or @abstract)")


def _one_line(text: str) -> str:
    # A newline would start a new KEY=VALUE field.
    return " ".join(str(text).splitlines())


def _parse_watchdog_interval(value: str | int | None) -> float | None:
    if value is None or value == "":
        return None
    try:
        usec = int(value)
    except (TypeError, ValueError):
        usec = 0
    if isinstance(value, bool) or usec <= 0:
        logger.warning("notify.watchdog_ignored: WATCHDOG_USEC={!r} is not a positive integer", value)
        return None
    return usec / 2 / 1_000_000
