"""What one request carries between the journal middleware, the mirror API and the response
code: one typed object under one request key (instead of loose string keys in the request)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from shoal_agent.authz import Credential


@dataclass
class Audit:
    """What the journal records about one request; filled in as the request is handled."""

    kind: str = "other"
    ns: str | None = None
    repository: str | None = None
    reference: str | None = None
    digest: str | None = None
    principal: str | None = None
    principal_confirmed: bool | None = None  # False: the registry does not check credentials
    cred_fpr: str | None = None
    credential: str | None = None
    authz_method: str | None = None
    registry_status: str | None = None
    source: str | None = None
    fallback: str | None = None  # why the blob came from the registry after all (its download's reason)
    verified: bool | None = None
    bytes: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    def credential_used(self, cred: Credential) -> None:
        self.credential, self.cred_fpr = cred.kind, cred.fingerprint


@dataclass
class RequestState:
    audit: Audit = field(default_factory=Audit)
    # Set by the journal middleware: awaited with the status right before the first byte goes out.
    before_start: Callable[[int], Awaitable[None]] | None = None
    response_started: bool = False  # a status line went out: an error can only cut the connection
    aborted: bool = False  # the agent cut the response itself (logged where it did)


STATE = web.RequestKey("shoal_state", RequestState)


def state_of(request: web.Request) -> RequestState:
    state = request.get(STATE)
    if state is None:
        state = request[STATE] = RequestState()
    return state


def audit_of(request: web.Request) -> Audit:
    return state_of(request).audit
