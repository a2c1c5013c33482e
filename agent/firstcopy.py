"""This node's share of a blob's first copy, taken from the origin (origin/firstcopy.py).

The node asks for a piece at a time, each the next piece no node has had from the origin, until
the origin says every piece has left it. Each piece goes into the torrent, which checks it
against the signed merkle tree as it does a peer's (a wrong one is dropped, and the swarm or the
registry brings it). The pieces then travel on to the other nodes as any piece does.
"""

from __future__ import annotations

import logging

import aiohttp

from shoal import errors
from shoal.clients import ApiError, OriginClient
from shoal.swarm import TorrentJob
from shoal_agent.metrics import AgentMetrics

log = logging.getLogger(__name__)

# The longest a piece may take: the origin sends one piece at a time, every node's in turn, so
# a node waits for the pieces of the nodes ahead of it too. The origin gives a node that does
# not take its piece SEND_TIMEOUT (10 s), so this covers a few of those.
PIECE_TIMEOUT = 60.0


async def take(job: TorrentJob, origin: OriginClient, ticket: str, metrics: AgentMetrics) -> int:
    """Add this node's share of the first copy to `job` until every piece has left the origin
    or the torrent is complete: the bytes taken. Any failure ends it (the swarm has the rest)."""
    meta, taken = job.meta, 0
    # (pieces fetched before libtorrent has checked the file, a relayed prefix's for one, would
    # wait in memory: the other nodes take them meanwhile)
    await job.checked.wait()
    # the pieces of a relayed prefix the check found whole: the origin sends them to no one again
    # (they reach the other nodes from here), told once
    have = job.have.find(0) if job.have_count < meta.num_pieces else meta.num_pieces
    log.debug("first copy of %s: %d pieces here already", meta.digest, have)
    try:
        while not job.finished.is_set():
            piece = await origin.first_copy_piece(meta.digest, ticket, piece_length=meta.piece_length,
                                                  within=PIECE_TIMEOUT, have=have)
            have = 0
            if piece is None:
                break
            index, data = piece
            if index >= meta.num_pieces or len(data) != min(meta.piece_length, meta.size - index * meta.piece_length):
                raise errors.IntegrityError(f"the origin sent piece {index} of {meta.num_pieces} with "
                                            f"{len(data)} bytes")
            job.add_piece(index, data)
            taken += len(data)
            metrics.first_copy_bytes.inc(len(data))
    except (aiohttp.ClientError, TimeoutError, ValueError, ApiError, errors.IntegrityError) as exc:
        log.info("first copy of %s ended after %d bytes: %s", meta.digest, taken,
                 errors.connection_problem(exc, origin.base, what="the origin")
                 if isinstance(exc, (aiohttp.ClientError, TimeoutError)) else exc)
        # no more pieces from there: the origin's seeder is for this node again, as for any
        job.swarm.stop_first_copy(job)
    return taken
