"""What `shoal up` checks before it starts anything, so that a problem is one line naming the
flag to change, never a banner followed by three components' errors: the ports it will listen
on are free, each registry answers, and the seeder's login works. And, while the components
start, that the process answering /readyz on a port is the child it started (another shoal
on the same port answers /readyz too)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from shoal import errors
from shoal.config import split_hostport
from shoal.registry import Challenge, Credentials, RegistryClient

USER_AGENT = "shoal-up/0.1"
REGISTRY_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Port:
    flag: str  # the option that sets it, named in the error
    host: str
    port: int


def busy_ports(ports: list[Port]) -> list[str]:
    """One line per port that cannot be listened on (or is given twice), naming its flag."""
    problems: list[str] = []
    seen: dict[tuple[str, int], str] = {}
    for p in ports:
        key = (p.host, p.port)
        if p.port != 0 and key in seen:
            problems.append(f"{p.flag} and {seen[key]} both name port {p.port}: change one of them")
            continue
        seen[key] = p.flag
        reason = _bind_problem(p.host, p.port)
        if reason is not None:
            problems.append(f"{p.flag}: cannot listen on {_hostport(p.host, p.port)}: {reason}; "
                            f"change {p.flag} (or stop what uses it)")
    return problems


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind_problem(host: str, port: int) -> str | None:
    """Why a listener cannot bind host:port now, or None. SO_REUSEADDR as the components' own
    listeners set it, so a port that only lingers in TIME_WAIT counts as free."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"no such address ({exc.strerror})"
    for family, kind, proto, _name, address in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(address)
                s.listen(1)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return "the port is in use"
                if exc.errno == errno.EADDRNOTAVAIL:
                    return "this host has no such address"
                return exc.strerror or str(exc)
    return None


@dataclass(frozen=True, slots=True)
class Login:
    url: str
    username: str | None
    password_file: str | None


def read_login(login: Login) -> Credentials | None:
    if login.username is None or login.password_file is None:
        return None
    try:
        password = Path(login.password_file).read_text().rstrip("\r\n")
    except OSError as exc:
        raise SystemExit(f"shoal up: --password-file: cannot read {login.password_file!r}: "
                         f"{exc.strerror}") from None
    except UnicodeDecodeError:
        raise SystemExit(f"shoal up: --password-file: {login.password_file!r} is not text") from None
    return Credentials(login.username, password)


async def _check_registry(http: aiohttp.ClientSession, login: Login) -> str | None:
    client = RegistryClient(http, login.url, credentials=read_login(login), user_agent=USER_AGENT,
                            read_timeout=REGISTRY_TIMEOUT, retry_budget=0.0)
    try:
        await asyncio.wait_for(client.check_login(), REGISTRY_TIMEOUT)
    except errors.LoginRefused as exc:  # by the registry or its token server
        return f"{exc}: check --username and --password-file (--upstream {login.url})"
    except errors.ShoalError as exc:  # unreachable (in plain words), or not a registry
        return f"{exc} (--upstream {login.url})"
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return errors.connection_problem(exc, login.url) + f" (--upstream {login.url})"
    return None


async def basic_login_wanted(url: str) -> str | None:
    """The realm of a registry that refuses anonymous pulls with a Basic challenge (htpasswd):
    without a login the origin can fetch nothing from it. None when it takes anonymous pulls,
    asks for a Bearer token (whose server may give anonymous ones), or cannot be asked (the
    login check says why)."""
    async with aiohttp.ClientSession() as http:
        try:
            async with http.get(url.rstrip("/") + "/v2/", headers={"User-Agent": USER_AGENT},
                                timeout=aiohttp.ClientTimeout(total=REGISTRY_TIMEOUT)) as r:
                challenge = Challenge.parse(r.headers.get("WWW-Authenticate", "")) if r.status == 401 else None
        except (TimeoutError, aiohttp.ClientError, OSError):
            return None
    if challenge is None or challenge.scheme != "basic":
        return None
    return challenge.params.get("realm", "")


async def registry_problems(logins: list[Login]) -> list[str]:
    """One line per registry that cannot be reached or refuses its login."""
    async with aiohttp.ClientSession() as http:
        found = await asyncio.gather(*(_check_registry(http, login) for login in logins))
    return [p for p in found if p is not None]


def _socket_inodes(pid: int) -> set[str] | None:
    """The inodes of the sockets process `pid` holds; None where /proc cannot tell."""
    inodes: set[str] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def _listening_inodes(port: int) -> set[str]:
    """Inodes of the TCP sockets listening on `port` (any address), from /proc/net/tcp{,6}."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                found.add(fields[9])
    return found


def owns_listener(pid: int, listen: str) -> bool:
    """Whether process `pid` itself listens on `listen`'s port: then a /readyz answer there is
    its own. True where /proc cannot tell (not Linux): the port check before the start stands."""
    mine = _socket_inodes(pid)
    if mine is None or not Path("/proc/net/tcp").exists():
        return True
    _host, port = split_hostport(listen)
    return bool(mine & _listening_inodes(port))
