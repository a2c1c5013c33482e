"""Credentials out of text that may be shown: a URL's `user:password@` becomes `user:***@`."""

from __future__ import annotations

import re

# `scheme://user:password@` or `scheme://token@` (a token used as the user name)
_USERINFO_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/?#@\s:'\"]*)(?P<password>:[^/?#@\s'\"]*)?@")
# `user:password@host` without a scheme (a registry name written as a URL's authority)
_BARE_RE = re.compile(r"(?<![^\s'\"(\[,=])(?P<user>[^/?#@\s:'\"]+):(?P<password>[^/?#@\s'\"]+)@(?=[\w\[])")


def redact(text: str) -> str:
    """`text` with the credentials of any URL in it replaced (`https://user:***@host`); a user
    name alone goes too (`https://***@host`), since tokens are often passed that way."""
    def hide(m: re.Match[str]) -> str:
        if m.group("password") is None:
            return f"{m.group('scheme')}***@"
        return f"{m.group('scheme')}{m.group('user')}:***@"

    return _BARE_RE.sub(lambda m: f"{m.group('user')}:***@", _USERINFO_RE.sub(hide, text))
