"""One exception hierarchy for every component, and the table that maps it to OCI errors.

Foreign exceptions (aiohttp, OSError, libtorrent) are translated at the edge of the module
that calls them; handlers only ever see `ShoalError` subclasses.
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import ssl
from dataclasses import dataclass
from typing import Any

import aiohttp

from shoal.redaction import redact


@dataclass(frozen=True, slots=True)
class OciCode:
    """An error code of the OCI distribution spec (or distribution's extensions) and its status."""

    code: str
    status: int
    message: str


# The spec's codes (distribution-spec "Error Codes") plus distribution's UNAVAILABLE/UNKNOWN,
# which clients such as containerd already understand.
BLOB_UNKNOWN = OciCode("BLOB_UNKNOWN", 404, "blob unknown to registry")
DIGEST_INVALID = OciCode("DIGEST_INVALID", 400, "provided digest is invalid")
MANIFEST_UNKNOWN = OciCode("MANIFEST_UNKNOWN", 404, "manifest unknown")
MANIFEST_INVALID = OciCode("MANIFEST_INVALID", 400, "manifest invalid")
NAME_INVALID = OciCode("NAME_INVALID", 400, "invalid repository name")
NAME_UNKNOWN = OciCode("NAME_UNKNOWN", 404, "repository name not known to registry")
SIZE_INVALID = OciCode("SIZE_INVALID", 400, "provided length did not match content length")
RANGE_INVALID = OciCode("RANGE_INVALID", 416, "requested range not satisfiable")
UNAUTHORIZED = OciCode("UNAUTHORIZED", 401, "authentication required")
DENIED = OciCode("DENIED", 403, "requested access to the resource is denied")
UNSUPPORTED = OciCode("UNSUPPORTED", 405, "the operation is unsupported")
PAGINATION_NUMBER_INVALID = OciCode("PAGINATION_NUMBER_INVALID", 400, "invalid number of results requested")
TOOMANYREQUESTS = OciCode("TOOMANYREQUESTS", 429, "too many requests")
UNAVAILABLE = OciCode("UNAVAILABLE", 503, "service unavailable")
UNKNOWN = OciCode("UNKNOWN", 500, "unknown error")
# shoal's own APIs (origin, tracker) answer in the same shape, with these codes besides the above.
INVALID_REQUEST = OciCode("INVALID_REQUEST", 400, "the request is malformed")
NOT_FOUND = OciCode("NOT_FOUND", 404, "not found")


class ShoalError(Exception):
    """Base of every error shoal raises on purpose."""

    oci: OciCode = UNKNOWN

    def __init__(self, message: str = "", *, detail: Any = None) -> None:
        super().__init__(message or self.oci.message)
        self.detail = detail

    @property
    def message(self) -> str:
        return str(self)


class ConfigError(ShoalError):
    """A configuration key is missing, unknown or has a bad value. The message names the key.

    Its message never carries a URL's credentials (shoal/redaction.py), whatever value a check
    put in it: config errors are printed to terminals and logs."""

    def __init__(self, message: str = "", *, detail: Any = None) -> None:
        super().__init__(redact(message), detail=detail)


class BadRequest(ShoalError):
    """The client's request is malformed; `oci` says how."""

    def __init__(self, oci: OciCode, message: str = "", *, detail: Any = None) -> None:
        self.oci = oci
        super().__init__(message or oci.message, detail=detail)


class NotFound(ShoalError):
    """The named thing does not exist (or is not visible through this name)."""

    def __init__(self, oci: OciCode, message: str = "", *, detail: Any = None) -> None:
        self.oci = oci
        super().__init__(message or oci.message, detail=detail)


class Unsupported(ShoalError):
    oci = UNSUPPORTED


class Unauthorized(ShoalError):
    """No credential, or not the one this route needs (401)."""

    oci = UNAUTHORIZED


class Denied(ShoalError):
    """The credential is known and is refused this (403)."""

    oci = DENIED


class LoginRefused(ShoalError):
    """The registry, or its token server, refused a login shoal was configured with (a node's or
    the seeder's; not a puller's). The message names the user and the realm, never the secret."""


class UpstreamError(ShoalError):
    """The registry could not be reached or answered with a server error."""

    oci = UNAVAILABLE


class CredentialRefused(UpstreamError):
    """The registry refused the credential a blob was fetched with (401 or 403 to the GET), after
    a yes for it: revoked, expired, or the repository's access changed in between."""


class IntegrityError(ShoalError):
    """Bytes did not hash to the digest they were fetched for. Never served."""

    oci = UNAVAILABLE


class SwarmUnavailable(ShoalError):
    """The swarm path (tracker, origin seeder, peers) cannot deliver; callers fall back."""

    oci = UNAVAILABLE


class Unavailable(ShoalError):
    """A store the service depends on (Redis, PostgreSQL) does not answer; retry later."""

    oci = UNAVAILABLE


class RateLimited(UpstreamError):
    """The registry keeps answering 429 beyond what the agent waits for."""

    oci = TOOMANYREQUESTS


class StoreFull(ShoalError):
    """The cache cannot make room (disk full or everything pinned)."""

    oci = UNAVAILABLE


def error_body(oci: OciCode, message: str | None = None, detail: Any = None) -> bytes:
    """The OCI error JSON document, as distribution writes it."""
    doc = {"errors": [{"code": oci.code, "message": message or oci.message, "detail": detail}]}
    return json.dumps(doc, separators=(",", ":")).encode()


# Where a registry's (or the origin's) CA comes from when the system store lacks it: the
# components verify with Python's default context, which reads this variable.
CA_HINT = "add its CA to the system trust store or point SSL_CERT_FILE at a PEM bundle that holds it"


def connection_problem(exc: BaseException, where: str, *, what: str = "the registry") -> str:
    """One line, in plain words and with the fix, for a call to `where` (host:port or a URL)
    that could not connect: refused, name not found, TLS verification, timeout. Never the
    exception's class name alone (`unreachable: ClientConnectorError` told nobody anything)."""
    cause: BaseException | None = exc
    if isinstance(exc, aiohttp.ClientConnectorError):
        cause = exc.os_error
    if isinstance(exc, (aiohttp.ClientConnectorCertificateError, ssl.SSLCertVerificationError)):
        reason = getattr(getattr(exc, "certificate_error", exc), "verify_message", None) or "untrusted certificate"
        return f"TLS verification of {where} failed ({reason}): {CA_HINT}"
    if isinstance(exc, aiohttp.ClientConnectorDNSError) or isinstance(cause, socket.gaierror):
        name = exc.host if isinstance(exc, aiohttp.ClientConnectorError) else where
        return f"name not found: {name} (DNS has no address for it): check the host name in the URL"
    if isinstance(exc, (aiohttp.ClientSSLError, ssl.SSLError)) or isinstance(cause, ssl.SSLError):
        return f"TLS with {where} failed ({getattr(cause, 'reason', None) or cause}): is it an https:// server?"
    if isinstance(cause, ConnectionRefusedError) or getattr(cause, "errno", None) == errno.ECONNREFUSED:
        return f"connection refused at {where}: is {what} running there, on that port?"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)) or isinstance(cause, TimeoutError):
        return f"no answer from {where} in time: is {what} up, and is the address reachable from here?"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return f"{where} closed the connection without an answer: is that {what}'s address?"
    if isinstance(cause, OSError) and cause.strerror:
        return f"cannot connect to {where}: {cause.strerror.lower()}"
    return f"cannot connect to {where}: {exc or type(exc).__name__}"


def read_problem(exc: BaseException, where: str) -> str:
    """One line for an answer from `where` that broke off after it started."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return f"{where} stopped sending mid-answer (no data in time)"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return f"{where} closed the connection mid-answer"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return f"{where}'s answer broke off (shorter than it said, or a broken encoding)"
    return f"{where}'s answer broke off ({connection_problem(exc, where)})"


def login_refused(user: str, realm: str | None, *, fix: str = "") -> str:
    """A registry's (or its token server's) 401 for a configured login, named by user and realm."""
    at = f" at realm {realm!r}" if realm else ""
    return f"the registry refused the login of user {user!r}{at} (HTTP 401){': ' + fix if fix else ''}"
