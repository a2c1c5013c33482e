"""Where a registry client sends its login for a token (shoal/registry.py): the registry's own
host, never in clear text when the registry is asked over TLS, and configured token realms by
whole path segments."""

from __future__ import annotations

import aiohttp
import pytest
from yarl import URL

from shoal import errors
from shoal.registry import Credentials, RegistryClient


@pytest.mark.parametrize(("base", "realm", "allowed"), [
    ("https://reg.example", "https://reg.example/token", True),
    ("https://reg.example", "https://reg.example:5001/token", True),  # a token server beside it
    ("https://reg.example", "http://reg.example/token", False),  # a downgrade: the login in clear
    ("https://reg.example", "http://reg.example:5001/token", False),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5001/token", True),  # a registry in clear anyway
    ("https://reg.example", "https://auth.example/token", True),
    ("https://reg.example", "https://auth.example/token/v2", True),
    ("https://reg.example", "https://auth.example/tokens", False),  # not below /token
    ("https://reg.example", "https://auth.example/tokenizer", False),
    ("https://reg.example", "http://auth.example/token", False),  # another origin
    ("https://reg.example", "https://evil.example/token", False),
    ("https://reg.example", "ftp://reg.example/token", False),
])
async def test_where_a_login_may_go(base: str, realm: str, allowed: bool) -> None:
    async with aiohttp.ClientSession() as http:
        client = RegistryClient(http, base, credentials=Credentials("node", "pw"), user_agent="t",
                                token_realms=["https://auth.example/token"])
        assert client._realm_allowed(URL(realm)) is allowed


async def test_a_downgraded_realm_is_refused_saying_why() -> None:
    async with aiohttp.ClientSession() as http:
        client = RegistryClient(http, "https://reg.example", credentials=Credentials("node", "pw"), user_agent="t")
        with pytest.raises(errors.UpstreamError, match=r"in clear text \(http://\) on 'reg.example'"):
            await client._fetch_token("http://reg.example/token", "reg", "repository:a:pull")
