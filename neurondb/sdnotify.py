"""systemd's notify protocol (sd_notify(3)) for `neurondb start --foreground` under a Type=notify unit.

systemd passes a datagram socket in $NOTIFY_SOCKET (a path, or an abstract-namespace name written with a
leading '@') and, when the unit sets WatchdogSec=, the timeout in $WATCHDOG_USEC (and the pid it applies to
in $WATCHDOG_PID). Messages are newline-separated KEY=VALUE lines in one datagram: READY=1, STOPPING=1,
WATCHDOG=1, STATUS=... No dependency: a plain AF_UNIX datagram.

`Notifier.from_env()` removes those variables from the environment, as sd_notify(unset_environment=1)
does: the processes the supervisor starts (the embedded PostgreSQL, which may speak the protocol itself)
must not report to systemd in its name.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("neurondb.sdnotify")

ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Sends notify messages to one socket; a failed send is logged once, never raised (systemd will
    judge the service by what it did or did not receive)."""

    def __init__(self, address: str, watchdog_usec: int | None = None) -> None:
        # '@name' is Linux's abstract namespace: the kernel wants a leading NUL byte instead.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_interval = watchdog_usec / 2e6 if watchdog_usec else None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._warned = False

    @classmethod
    def from_env(cls) -> Notifier | None:
        """A notifier when $NOTIFY_SOCKET is set, else None; takes the variables out of the environment.
        The watchdog is on only when $WATCHDOG_USEC is a positive number and $WATCHDOG_PID, if set, is us."""
        env = {name: os.environ.pop(name, "") for name in ENV_VARS}
        if not env["NOTIFY_SOCKET"]:
            return None
        usec = int(env["WATCHDOG_USEC"]) if env["WATCHDOG_USEC"].isdigit() else 0
        if env["WATCHDOG_PID"] and env["WATCHDOG_PID"] != str(os.getpid()):
            usec = 0
        return cls(env["NOTIFY_SOCKET"], usec or None)

    def notify(self, *lines: str) -> None:
        """Send `lines` (KEY=VALUE) as one datagram."""
        try:
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            if not self._warned:
                log.warning("could not notify systemd through %s: %s", self.address.replace("\0", "@"), exc)
                self._warned = True

    def close(self) -> None:
        self._sock.close()
