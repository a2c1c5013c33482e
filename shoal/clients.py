"""Typed clients of the origin's and the tracker's APIs, built on shoal.protocol (the agent, the
origin's registration and the journal shipper use them; nobody builds these requests by hand).

A call returns the answer's typed body, or raises:
- `ApiError` when the server answered with a status the call does not expect. Its text carries
  the status only: a server's body could echo anything, a credential included, and these errors
  are logged. The server's own error message is in `detail`, for a person at a terminal;
- aiohttp.ClientError / TimeoutError when the server could not be reached or did not answer in
  time, so callers can tell "down" from "refused".

No call follows a redirect (components never redirect each other): aiohttp drops only
Authorization and Cookie on a redirect to another host, and would send that host a puller's
credential (PULLER_AUTHORIZATION_HEADER), a relay ticket or a journal batch. A redirect is an
ApiError like any other status.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shoal import errors, protocol, signing
from shoal.oci import Digest


class ApiError(errors.ShoalError):
    def __init__(self, what: str, status: int, detail: str | None = None, *, code: str | None = None) -> None:
        super().__init__(f"{what}: HTTP {status}")
        self.status = status
        self.detail = detail  # the error document's message, printable and short; never logged
        self.code = code  # the error document's `detail` when it is one of shoal's (protocol.NOT_ENROLLED)

    @property
    def not_enrolled(self) -> bool:
        return self.status == 403 and self.code == protocol.NOT_ENROLLED


async def _refused(r: aiohttp.ClientResponse, what: str) -> ApiError:
    """An ApiError for an answer with an unexpected status, with the message of shoal's error
    document (web.error_response) as its detail when there is one."""
    detail = code = None
    try:
        doc = await r.json(content_type=None)
        message = doc["errors"][0]["message"]
        if isinstance(message, str):
            detail = "".join(c if c.isprintable() else "?" for c in message[:300])
        if doc["errors"][0].get("detail") == protocol.NOT_ENROLLED:
            code = protocol.NOT_ENROLLED
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, aiohttp.ClientError):
        pass
    return ApiError(what, r.status, detail, code=code)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}  # no token: the server's 401 says so


class OriginClient:
    """The origin's API as a cluster node uses it (with the node token); operators use
    OperatorClient."""

    def __init__(self, http: aiohttp.ClientSession, base: str, node_token: str) -> None:
        self.http, self.base, self._auth = http, base, _bearer(node_token)

    def _signed(self, kind: str, body: bytes, key: Ed25519PrivateKey) -> dict[str, str]:
        return {**self._auth, "Content-Type": "application/json",
                protocol.NODE_SIGNATURE_HEADER: signing.sign_request(key, kind, body)}

    async def grants(self, request: protocol.GrantsRequest, key: Ed25519PrivateKey, *,
                     within: float) -> protocol.Grants:
        """Enroll and renew, signed with the node's key (the one in the request)."""
        body = request.encode()
        async with self.http.post(protocol.GRANTS.url(self.base), data=body, headers=self._signed("grants", body, key),
                                  timeout=aiohttp.ClientTimeout(total=within), allow_redirects=False) as r:
            if r.status != 200:
                raise ApiError("the origin refused this node's enrollment", r.status)
            return protocol.Grants.from_json(await r.json())

    async def admission(self, digest: Digest, request: protocol.AdmissionRequest, credential: str | None,
                        key: Ed25519PrivateKey, *, within: float,
                        connect: float | None = None) -> protocol.Admission | protocol.RelayTicket | None:
        """Ask to join `digest`'s swarm for a puller whose credential is `credential` (None:
        anonymous). ApiError 403 if the registry does not let that credential pull the blob;
        None if the request was `seeded_only` and the origin does not seed the blob; a
        RelayTicket if it asked for `relay` and the origin is still to fetch the blob."""
        body = request.encode()
        headers = self._signed("admission", body, key)
        if credential is not None:
            headers[protocol.PULLER_AUTHORIZATION_HEADER] = credential
        # (`connect`: an origin that does not even take the connection in this long is passed over
        # for the next one, without spending the whole budget on it)
        async with self.http.post(protocol.ADMISSION.url(self.base, digest=str(digest)), data=body,
                                  headers=headers,
                                  timeout=aiohttp.ClientTimeout(total=within, sock_connect=connect),
                                  allow_redirects=False) as r:
            if r.status == 204 and request.seeded_only:
                return None
            if r.status == 202 and request.relay:
                return protocol.RelayTicket.from_json(await r.json())
            if r.status != 200:
                raise await _refused(r, "the origin did not admit this node to the blob's swarm")
            return protocol.Admission.from_json(await r.json())

    async def relay(self, digest: Digest, ticket: protocol.RelayTicket, *, connect: float,
                    idle: float) -> AsyncGenerator[bytes, None]:
        """The blob's bytes as the origin fetches it, until it is seeded (nothing if it already
        is): unverified, see protocol.RelayTicket. `idle`: the longest wait for the next bytes."""
        async with self.http.get(protocol.RELAY.url(self.base, digest=str(digest)),
                                 headers={**self._auth, protocol.RELAY_TICKET_HEADER: ticket.ticket},
                                 timeout=aiohttp.ClientTimeout(sock_connect=connect, sock_read=idle),
                                 allow_redirects=False) as r:
            if r.status == 204:
                return
            if r.status != 200:
                raise await _refused(r, "the origin did not relay the blob")
            async for chunk in r.content.iter_any():
                yield chunk

    async def first_copy_piece(self, digest: Digest, ticket: str, *, piece_length: int, within: float,
                               have: int = 0) -> tuple[int, bytes] | None:
        """The next piece of the blob's first copy for this node (index, bytes; unverified: the
        torrent checks them), None once every piece has left the origin. A piece that says it is
        longer than `piece_length` is refused unread. `have`: this node has verified the blob's
        first `have` pieces (a relay's), which the origin need send no one."""
        headers = {**self._auth, protocol.FIRST_COPY_TICKET_HEADER: ticket}
        if have > 0:
            headers[protocol.FIRST_COPY_HAVE_HEADER] = str(have)
        async with self.http.get(protocol.FIRST_COPY.url(self.base, digest=str(digest)), headers=headers,
                                 timeout=aiohttp.ClientTimeout(total=within), allow_redirects=False) as r:
            if r.status == 204:
                return None
            if r.status != 200:
                raise await _refused(r, "the origin did not send a piece of the blob's first copy")
            index = r.headers.get(protocol.FIRST_COPY_PIECE_HEADER, "")
            length = r.content_length
            if not (index.isascii() and index.isdigit() and len(index) <= 10) or length is None \
                    or not 0 < length <= piece_length:
                raise errors.IntegrityError("the origin's first-copy piece has no index or a wrong length")
            return int(index), await r.content.readexactly(length)

    async def ship_journal(self, batch: protocol.JournalBatch, key: Ed25519PrivateKey, *,
                           within: float) -> protocol.JournalAck:
        """Ship a batch signed with the node's own key (the collector checks it against the key
        the node enrolled with)."""
        body = batch.encode()
        async with self.http.post(protocol.JOURNAL.url(self.base), data=body,
                                  headers={**self._auth, "Content-Type": "application/json",
                                           protocol.NODE_SIGNATURE_HEADER: signing.sign_batch(key, body)},
                                  timeout=aiohttp.ClientTimeout(total=within), allow_redirects=False) as r:
            if not 200 <= r.status < 300:
                raise await _refused(r, "collector refused a journal batch")
            return protocol.JournalAck.from_json(await r.json())


class PeerOriginClient:
    """Another origin's API as an origin uses it (several origins): with the peer token the
    origins share, which no node and no operator holds."""

    def __init__(self, http: aiohttp.ClientSession, base: str, peer_token: str) -> None:
        self.http, self.base, self._auth = http, base, _bearer(peer_token)

    async def replica(self, digest: Digest, request: protocol.ReplicaRequest, *,
                      within: float) -> protocol.Replica:
        """Have that origin seed `digest` too; answered once it does."""
        async with self.http.post(protocol.REPLICA.url(self.base, digest=str(digest)), json=request.to_json(),
                                  headers=self._auth, timeout=aiohttp.ClientTimeout(total=within),
                                  allow_redirects=False) as r:
            if r.status != 200:
                raise await _refused(r, "the other origin did not seed the blob")
            return protocol.Replica.from_json(await r.json())


class OperatorClient:
    """The origin's operator API (pre-seed, jobs, audit, seeded blobs), with an operator's own
    Authorization: "Bearer shoal_op_..." (a static operator token), a registry login ("Basic
    ...") or a registry token ("Bearer ..."). Never the node token: the origin refuses it here."""

    def __init__(self, http: aiohttp.ClientSession, base: str, authorization: str) -> None:
        self.http, self.base = http, base
        self._auth = {"Authorization": authorization} if authorization else {}

    async def seeded(self, *, within: float = 30) -> protocol.Seeded:
        async with self.http.get(protocol.SEEDED.url(self.base), headers=self._auth,
                                 timeout=aiohttp.ClientTimeout(total=within), allow_redirects=False) as r:
            if r.status != 200:
                raise await _refused(r, "origin refused the list of seeded blobs")
            return protocol.Seeded.from_json(await r.json())

    async def preseed(self, request: protocol.PreseedRequest, *, within: float = 30) -> protocol.PreseedJob:
        async with self.http.post(protocol.PRESEED.url(self.base), json=request.to_json(), headers=self._auth,
                                  timeout=aiohttp.ClientTimeout(total=within), allow_redirects=False) as r:
            if r.status != 202:
                raise await _refused(r, "origin refused the pre-seed")
            return protocol.PreseedJob.from_json(await r.json())

    async def preseed_job(self, job: str, *, within: float = 30) -> protocol.PreseedJob:
        async with self.http.get(protocol.PRESEED_JOB.url(self.base, job=job), headers=self._auth,
                                 timeout=aiohttp.ClientTimeout(total=within), allow_redirects=False) as r:
            if r.status != 200:
                raise await _refused(r, "origin has no such pre-seed job")
            return protocol.PreseedJob.from_json(await r.json())

    async def audit(self, query: protocol.AuditQuery, *, within: float = 60) -> protocol.AuditPage:
        if query.format != "json":
            raise ValueError("audit() reads json; use audit_text() for jsonl and csv")
        return protocol.AuditPage.from_json(json.loads(await self.audit_text(query, within=within)))

    async def audit_text(self, query: protocol.AuditQuery, *, within: float = 60) -> str:
        """The answer as the server wrote it (json, jsonl or csv, as `query.format` asks)."""
        async with self.http.get(protocol.AUDIT.url(self.base, query.to_query()), headers=self._auth,
                                 timeout=aiohttp.ClientTimeout(total=within), allow_redirects=False) as r:
            if r.status != 200:
                raise await _refused(r, "origin refused the audit query")
            return await r.text()


async def status(http: aiohttp.ClientSession, base: str, *, within: float = 10) -> dict[str, Any]:
    """Any component's public STATUS document (its fields differ by component)."""
    async with http.get(protocol.STATUS.url(base), timeout=aiohttp.ClientTimeout(total=within),
                        allow_redirects=False) as r:
        if r.status != 200:
            raise await _refused(r, "status")
        doc = await r.json(content_type=None)
        if not isinstance(doc, dict):
            raise ApiError("status is not a JSON object", r.status)
        return doc


class TrackerClient:
    """The tracker's registration API, as the origin uses it (registration token)."""

    def __init__(self, http: aiohttp.ClientSession, base: str, token: str) -> None:
        self.http, self.base, self._auth = http, base, _bearer(token)

    async def register(self, digest: Digest, raw: bytes, signature: str, *, within: float) -> None:
        async with self.http.put(protocol.REGISTER_METAINFO.url(self.base, digest=str(digest)), data=raw,
                                 headers={**self._auth, "Content-Type": protocol.TORRENT_TYPE,
                                          protocol.SIGNATURE_HEADER: signature},
                                 timeout=aiohttp.ClientTimeout(total=within), allow_redirects=False) as r:
            if r.status != 201:
                raise ApiError("tracker refused the registration", r.status)

    async def unregister(self, digest: Digest, *, within: float) -> None:
        async with self.http.delete(protocol.UNREGISTER_METAINFO.url(self.base, digest=str(digest)),
                                    headers=self._auth, timeout=aiohttp.ClientTimeout(total=within),
                                    allow_redirects=False) as r:
            if r.status not in (204, 404):
                raise ApiError("tracker refused to unregister", r.status)
