"""Logging for every component: configured once in `__main__`, text or JSON lines.

Modules log through `logging.getLogger(__name__)` and never pass secrets. As a second line of
defence the handler scrubs anything shaped like an Authorization value (`Basic ...`,
`Bearer ...`, `password=...`) before a record is written.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import sys
import time
from typing import Any, Literal

_SECRET_PATTERNS = [
    re.compile(r"(?i)\b(basic|bearer)\s+[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"(?i)\b(password|passwd|secret|token)([\"']?\s*[:=]\s*[\"']?)[^\s\"',}&]+"),
]
# Record attributes that logging sets itself; anything else passed in `extra=` goes to JSON.
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime", "taskName"}


def fingerprint(secret: str | bytes, key: bytes) -> str:
    """What may be logged or stored instead of a credential: a truncated HMAC-SHA-256 under a
    key the cluster keeps. A bare hash of a Basic header, next to the user name in the journal,
    cracked offline at a million guesses a second per core; without the key there is nothing to
    guess against."""
    # (surrogateescape: a header that was not valid UTF-8 fingerprints as the bytes it was)
    data = secret.encode("utf-8", "surrogateescape") if isinstance(secret, str) else secret
    return "fp:" + hmac.new(key, data, hashlib.sha256).hexdigest()[:16]


def scrub(text: str) -> str:
    text = _SECRET_PATTERNS[0].sub(lambda m: f"{m.group(1)} <redacted>", text)
    return _SECRET_PATTERNS[1].sub(lambda m: f"{m.group(1)}{m.group(2)}<redacted>", text)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))


class _JsonFormatter(logging.Formatter):
    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "component": self.component,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                doc[key] = value if isinstance(value, (int, float, bool, type(None))) else str(value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return scrub(json.dumps(doc, ensure_ascii=False))


class _QuietProtocolErrors(logging.Filter):
    """aiohttp logs a full traceback for every malformed request line, e.g. podman probing a
    plain-HTTP mirror with TLS first. One debug line is enough for that."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and type(exc).__module__.startswith("aiohttp.http_exceptions"):
            if logging.getLogger("aiohttp.server").isEnabledFor(logging.DEBUG):
                record.msg, record.args, record.exc_info, record.exc_text = (
                    f"bad request from client: {type(exc).__name__}", (), None, None)
                record.levelno, record.levelname = logging.DEBUG, "DEBUG"
                return True
            return False
        return True


def setup(component: str, *, level: str = "info", fmt: Literal["text", "json"] = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter(component))
    else:
        handler.setFormatter(_TextFormatter(f"%(asctime)s {component} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would record every blob request; our own request log replaces it.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(_QuietProtocolErrors())
