"""systemd's service notifications (sd_notify(3)), in pure Python: READY=1 once a component
serves and is ready, WATCHDOG=1 while its event loop runs, STOPPING=1 when it shuts down.

Without $NOTIFY_SOCKET (not started by systemd with Type=notify) every call here does nothing.
The socket is a unix datagram socket, a path or, starting with "@", an abstract name."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

log = logging.getLogger(__name__)

READY_POLL = 0.1
"""How often the ready check is asked until it passes (it is the /readyz check: cheap)."""


def _address(env: Mapping[str, str]) -> str | None:
    path = env.get("NOTIFY_SOCKET", "")
    if not path or not (path.startswith("/") or path.startswith("@")):
        return None  # unset, or a vsock address (not for services on a host)
    return "\0" + path[1:] if path.startswith("@") else path


def notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send `message` ("READY=1", ...) to systemd; False when there is no socket or it failed.
    Never raises: a notification lost must not take a component down (systemd then times the
    start out or the watchdog fires, which says more than a traceback would)."""
    address = _address(os.environ if env is None else env)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("cannot notify systemd (%s): %s", message.split("=", 1)[0], exc.strerror or exc)
        return False
    return True


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec=, as sd_watchdog_enabled(3)
    advises), or None when systemd watches nothing or watches another process
    ($WATCHDOG_PID names the process it expects pings from)."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2 / 1_000_000


async def _ready_then_notify(ready: Callable[[], Awaitable[bool]]) -> None:
    while True:
        try:
            if await ready():
                break
        except Exception:  # a broken check must not end the wait silently: systemd times the start out
            log.exception("the ready check failed")
        await asyncio.sleep(READY_POLL)
    notify("READY=1")
    log.debug("notified systemd: ready")


async def _watchdog(interval: float) -> None:
    # Pinged from the event loop itself: a loop that is blocked, or a process that is stopped
    # (SIGSTOP) or wedged, stops pinging, and systemd kills and restarts the service.
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def service(ready: Callable[[], Awaitable[bool]]) -> AsyncIterator[None]:
    """Around a component's serving: READY=1 as soon as `ready()` returns True (asked every
    READY_POLL seconds), WATCHDOG=1 every WatchdogSec/2, STOPPING=1 on the way out, before the
    app's cleanup (so `systemctl stop` shows "deactivating" while connections drain).
    Nothing without $NOTIFY_SOCKET."""
    if _address(os.environ) is None:
        yield
        return
    tasks = [asyncio.create_task(_ready_then_notify(ready))]
    interval = watchdog_interval()
    if interval is not None:
        tasks.append(asyncio.create_task(_watchdog(interval)))
    try:
        yield
    finally:
        notify("STOPPING=1")
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
