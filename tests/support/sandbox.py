"""Run a command under the kernel restrictions of systemd/*.service that could break a
component, without systemd (PID 1 is not systemd on a test machine):

- NoNewPrivileges=yes;
- MemoryDenyWriteExecute=yes: the kernel's own MDWE (prctl PR_SET_MDWE, Linux 6.3+), which
  refuses what systemd's seccomp rules refuse (memory both writable and executable, or made
  executable later);
- SystemCallFilter=@system-service, then ~@privileged @resources, SystemCallErrorNumber=EPERM:
  a seccomp allow list from `systemd-analyze syscall-filter`, so the groups are systemd's own;
- RestrictAddressFamilies=: socket() of any other family fails.

The namespaces (ProtectSystem=, PrivateUsers=, ...) are not reproduced: they take away files a
component never opens; the unit's paths are checked by systemd-analyze verify.

    /usr/bin/python3 sandbox.py --families AF_INET,AF_INET6,AF_UNIX,AF_NETLINK -- COMMAND...

Runs with Debian's python3-seccomp, hence the system Python, and then execs COMMAND."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import os
import socket
import subprocess
import sys

import seccomp

PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1


def expand(group: str, seen: set[str] | None = None) -> set[str]:
    """The system calls of a systemd group (`@name`), nested groups included."""
    seen = set() if seen is None else seen
    out = subprocess.run(["systemd-analyze", "syscall-filter", group], check=True, capture_output=True,
                         text=True).stdout
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if name.startswith("@"):
            if name not in seen:
                seen.add(name)
                calls |= expand(name, seen)
        else:
            calls.add(name)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--allow", default="@system-service")
    parser.add_argument("--deny", default="@privileged,@resources")
    parser.add_argument("--families", default="AF_INET,AF_INET6,AF_UNIX")
    parser.add_argument("command", nargs="+")
    args = parser.parse_args()

    allowed = expand(args.allow)
    for group in filter(None, args.deny.split(",")):
        allowed -= expand(group)
    families = [int(getattr(socket, name)) for name in args.families.split(",")]

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        sys.exit(f"sandbox: prctl(PR_SET_MDWE): {os.strerror(ctypes.get_errno())}")

    f = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.EPERM))
    for name in sorted(allowed - {"socket"}):
        # a name that is no system call of this architecture: systemd skips those too
        with contextlib.suppress(RuntimeError, ValueError):
            f.add_rule(seccomp.ALLOW, name)
    if "socket" in allowed:
        for family in families:
            f.add_rule(seccomp.ALLOW, "socket", seccomp.Arg(0, seccomp.EQ, family))
    f.load()  # sets no_new_privs first (NoNewPrivileges=yes)
    os.execvp(args.command[0], args.command)  # noqa: S606 (the command line is the caller's)


if __name__ == "__main__":
    main()
