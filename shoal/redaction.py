"""Credentials out of text that may be shown: a URL's `user:password@` becomes `user:***@`."""

from __future__ import annotations

import re

# What follows a login's last "@": a host (name, IPv4 or [IPv6]), an optional port, then the end
# of the URL's authority. A password may itself hold "@", "/", "?" or "#" (written unencoded, as
# people do): the login runs to the LAST "@" before such a host, so no part of it is left shown
# ("https://user:p@ss@host" showed "ss"; "https://user:pa/ss@host" showed all of "pa/ss"). An
# image digest after "@" ("docker://reg/name@sha256:...") is not a host and port, so it stays.
_HOST_AFTER = r"(?=(?:[\w.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]*)?(?:[/?#\s'\"),\]]|$))"
# `scheme://user:password@` or `scheme://token@` (a token used as the user name)
_USERINFO_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<login>[^\s'\"]*)@" + _HOST_AFTER)
# `user:password@host` without a scheme (a registry name written as a URL's authority)
_BARE_RE = re.compile(r"(?<![^\s'\"(\[,=])(?P<user>[^/?#@\s:'\"]+):(?P<password>[^/?#\s'\"]+)@" + _HOST_AFTER)


def redact(text: str) -> str:
    """`text` with the credentials of any URL in it replaced (`https://user:***@host`); a user
    name alone goes too (`https://***@host`), since tokens are often passed that way."""
    def hide(m: re.Match[str]) -> str:
        user, colon, _ = m.group("login").partition(":")
        if not colon or any(c in user for c in "/?#@"):  # a token, or no telling the user from the rest
            return f"{m.group('scheme')}***@"
        return f"{m.group('scheme')}{user}:***@"

    return _BARE_RE.sub(lambda m: f"{m.group('user')}:***@", _USERINFO_RE.sub(hide, text))
