"""Swarms and registered torrents in Redis: any number of tracker replicas share them.

Each announce is one Lua script (one round trip, atomic): it checks the torrent is registered,
drops the swarm's expired peers, records the peer and picks the answer, all against Redis's own
clock (`TIME`), so expiry is exact whichever replica answers and however their clocks differ.
Keys (under `prefix`):

    torrents            hash  tracker hash hex -> digest hex      (the announce whitelist; the
    digests             hash  digest hex -> tracker hash hex       metainfo itself is not needed)
    swarm:<ih>:s / :l   zset  "ip|port" -> last seen (us; ties would make "oldest" arbitrary), seeders / leechers
    swarm:<ih>:zs:<z>   zset  the same, for zone z only (tracker/zones.py); :zl:<z> its leechers
    swarm:<ih>:g:<z>    zset  zone z's gateways: node names; :gm:<z> hash node -> its "ip|port"
    swarm:<ih>:bs / :bl zset  the boundary: peers without a zone and gateways, seeders / leechers
    swarm:<ih>:o        zset  the origins' seeders among the seeders (tracker/peers.py ORIGIN_SPARE)
    swarm:<ih>:n        hash  "ip|port" -> the node its swarm token names
    swarm:<ih>:p        hash  "ip|port" -> the peer as answers carry it (see _record)
    swarm:<ih>:z        hash  "ip|port" -> "zone|node" (peers with a zone)
    swarm:<ih>:a        zset  "ip|port" at score 0 (by address, for max_peers_per_address)
    swarm:<ih>:d        int   completed downloads

A swarm's keys expire two peer TTLs after its last announce, so abandoned swarms leave nothing.
One Redis (a primary, with a replica and Sentinel if wanted), not Redis Cluster: the scripts
touch the torrents hash and a swarm's keys together.
"""

from __future__ import annotations

import binascii
import ipaddress
import struct
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shoal.metainfo import Metainfo
from shoal.oci import Digest
from shoal_tracker import zones
from shoal_tracker.peers import ORIGIN_SPARE, SPARE_SCAN, Peer
from shoal_tracker.store import Answer, StoreUnavailable, Totals

# Tracker hashes a replica remembers resolving (a torrent's tracker hash names its digest for good).
KNOWN_HASHES = 100_000

_COMMON = r"""
local base = KEYS[2]
local S, L, P, Z, A, D = base .. 's', base .. 'l', base .. 'p', base .. 'z', base .. 'a', base .. 'd'
local BS, BL = base .. 'bs', base .. 'bl'  -- the boundary: peers without a zone, and gateways
local O, N = base .. 'o', base .. 'n'  -- the origins' seeders; each peer's node
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
-- numbers as exact integers: redis.call would format them with 14 digits (microseconds have 16)
local function int(x) return string.format('%d', x) end

-- a zoned peer's "zone|node" (its node: the one its swarm token names)
local function zone_node(m)
  local v = redis.call('HGET', Z, m)
  if not v then return nil, nil end
  local bar = string.find(v, '|', 1, true)
  return string.sub(v, 1, bar - 1), string.sub(v, bar + 1)
end

local function remove(m)
  local z, n = zone_node(m)
  if z then
    redis.call('ZREM', base .. 'zs:' .. z, m)
    redis.call('ZREM', base .. 'zl:' .. z, m)
    if redis.call('HGET', base .. 'gm:' .. z, n) == m then  -- the node's gateway slot goes with it
      redis.call('ZREM', base .. 'g:' .. z, n)
      redis.call('HDEL', base .. 'gm:' .. z, n)
    end
    redis.call('HDEL', Z, m)
  end
  redis.call('ZREM', S, m)
  redis.call('ZREM', L, m)
  redis.call('ZREM', BS, m)
  redis.call('ZREM', BL, m)
  redis.call('ZREM', O, m)
  redis.call('HDEL', N, m)
  redis.call('ZREM', A, m)
  redis.call('HDEL', P, m)
end

-- every peer not seen for ttl leaves before anything is read: what is left is live, so answers
-- need no scores (usually nothing is stale, and the range read is O(log n))
local function expire(cutoff)
  local n = 0
  for _, key in ipairs({S, L}) do
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', key, '-inf', '(' .. int(cutoff))) do remove(m); n = n + 1 end
  end
  return n
end
"""

# KEYS: torrents, swarm base. ARGV: ih hex, "ip|port", ip, record, seeder 0/1, event, zone,
# ttl us, max peers, max per address, want, zone gateways, reserved places, node, origin 0/1,
# origin spare (-1: none, see _spare), spare scan (tracker/peers.py ORIGIN_SPARE, SPARE_SCAN), spare
# window us, stalled 0/1.
_ANNOUNCE = _COMMON + r"""
local ih, me, ip, record = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local seeder, event, zone = ARGV[5] == '1', ARGV[6], ARGV[7]
local ttl, max_peers, max_addr = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
-- every key this announce writes outlives it by two peer TTLs, so an abandoned swarm leaves nothing
-- (each key its own: one created after another's renewal would otherwise never expire)
local keep_ms = math.floor(ttl / 500)
local function write(command, key, ...)
  redis.call(command, key, ...)
  redis.call('PEXPIRE', key, keep_ms)
end
local want, gateways, reserved = tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13])
local node, origin, spare, scan = ARGV[14], ARGV[15] == '1', tonumber(ARGV[16]), tonumber(ARGV[17])
local window = tonumber(ARGV[18])
-- a stalled leecher (protocol.ANNOUNCE_STALLED) is handed the origins' seeders first
local stalled = ARGV[19] == '1' and not seeder
-- zone z's gateways: node names (one slot per node) by last announce, and the key each used last
local G, GM = base .. 'g:' .. zone, base .. 'gm:' .. zone
local gateway = false
if redis.call('HEXISTS', KEYS[1], ih) == 0 then return false end
local cutoff = now - ttl
expire(cutoff)

if event == 'stopped' then
  remove(me)
else
  local known = redis.call('HEXISTS', P, me) == 1
  if event == 'completed' and not redis.call('ZSCORE', S, me) then write('INCR', D) end
  local listed = true
  if not known then
    local same = redis.call('ZRANGEBYLEX', A, '[' .. ip .. '|', '[' .. ip .. '|\255')
    if #same >= max_addr then
      -- the address's oldest entry makes room (a restart's new port)
      local oldest, oldest_t = nil, nil
      for _, m in ipairs(same) do
        local sc = tonumber(redis.call('ZSCORE', S, m) or redis.call('ZSCORE', L, m) or '0')
        if not oldest_t or sc < oldest_t then oldest, oldest_t = m, sc end
      end
      remove(oldest)
    end
    if redis.call('ZCARD', S) + redis.call('ZCARD', L) >= max_peers then listed = false end
  else
    local z, n = zone_node(me)
    -- a node that moved zones is no gateway of its old one (a peer without a zone has no node
    -- recorded here: comparing it would remove and re-add every such peer on every announce)
    if (z and (z ~= zone or n ~= node)) or (not z and zone ~= '') then
      remove(me)
      known = false
    end
  end
  if listed then
    local mine, other, zmine, zother = L, S, 'zl:', 'zs:'
    if seeder then mine, other, zmine, zother = S, L, 'zs:', 'zl:' end
    redis.call('ZREM', other, me)
    write('ZADD', mine, int(now), me)
    if origin and seeder then write('ZADD', O, int(now), me) else redis.call('ZREM', O, me) end
    write('HSET', N, me, node)
    if not known then write('ZADD', A, 0, me) end
    write('HSET', P, me, record)  -- (a restart on the same port brings a new peer id)
    if zone ~= '' then
      write('HSET', Z, me, zone .. '|' .. node)
      redis.call('ZREM', base .. zother .. zone, me)
      write('ZADD', base .. zmine .. zone, int(now), me)
      gateway = redis.call('ZSCORE', G, node) ~= false
      if not gateway and not seeder and redis.call('ZCOUNT', G, int(cutoff), '+inf') < gateways then
        gateway = true  -- the zone lacks a gateway (tracker/zones.py)
      end
      if gateway then
        write('ZADD', G, int(now), node)
        write('HSET', GM, node, me)
      end
    end
    local bmine, bother = BL, BS
    if seeder then bmine, bother = BS, BL end
    redis.call('ZREM', bother, me)
    if zone == '' or gateway then
      write('ZADD', bmine, int(now), me)
    else
      redis.call('ZREM', bmine, me)
    end
  end
end

local chosen, seen = {}, {}
seen[me] = true
-- a leecher is not handed the origins' seeders while the swarm has seeders of its own on `spare`
-- nodes, on the boundary, heard from within `window` (TrackerConfig.spare_window), that it can use;
-- the `scan` latest looked at (tracker/peers.py ORIGIN_SPARE); and an origin's seeder is handed
-- no leecher then
local skipped, spared = 0, false
local asker = origin and seeder
if (not seeder or asker) and event ~= 'stopped' and spare > 0 and redis.call('EXISTS', O) == 1 then
  local fresh = int(math.floor(now - window))
  -- only seeders the requester can use: not its own node's, and of its address family
  local v6 = string.find(ip, ':', 1, true) ~= nil
  local nodes, count = {}, 0
  for _, m in ipairs(redis.call('ZREVRANGEBYSCORE', BS, '+inf', fresh, 'LIMIT', 0, scan)) do
    if count >= spare then break end
    local ip6 = string.find(m, ':', 1, true) ~= nil  -- "ip|port": only an IPv6 address has a colon
    if ip6 == v6 and not redis.call('ZSCORE', O, m) then
      local n = redis.call('HGET', N, m)
      if n and n ~= node and not nodes[n] then nodes[n] = true; count = count + 1 end
    end
  end
  spared = count >= spare
end
-- spare -1: a leecher taking its share of the first copy from the origin (protocol.ANNOUNCE_FIRST_COPY)
if spare < 0 and not seeder and event ~= 'stopped' then spared = true end
if spared then
  for _, m in ipairs(redis.call('ZRANGE', O, 0, -1)) do
    if not seen[m] then seen[m] = true; skipped = skipped + 1 end
  end
end
-- up to n members of zset `key` at random, none already chosen (or skipped), none of zone `skip`
local function take(key, n, skip)
  if n <= 0 then return 0 end
  local ask = n + 1 + skipped
  if skip then  -- the boundary holds the zone's own gateways (their ports), and what is chosen
    ask = ask + #chosen + redis.call('ZCARD', G) * max_addr
  end
  local added = 0
  for _, m in ipairs(redis.call('ZRANDMEMBER', key, ask)) do
    if added >= n then break end
    if not seen[m] and (not skip or zone_node(m) ~= skip) then
      seen[m] = true
      chosen[#chosen + 1] = m
      added = added + 1
    end
  end
  return added
end

if event ~= 'stopped' and not (spared and asker) then
  if stalled then take(O, want, nil) end
  if zone == '' then
    -- the boundary (every peer, where no node states a zone)
    if not seeder then take(BS, want - #chosen, nil) end
    take(BL, want - #chosen, nil)
  else
    -- tracker/zones.py: a gateway's first places go to the boundary's seeders, then its zone,
    -- then the rest of the boundary; another node gets its zone (the boundary if it is alone)
    if gateway and not seeder then take(BS, math.min(reserved, want - #chosen), zone) end
    local before = #chosen
    if not seeder then take(base .. 'zs:' .. zone, want - #chosen, nil) end
    take(base .. 'zl:' .. zone, want - #chosen, nil)
    if gateway or #chosen == before then
      if not seeder then take(BS, want - #chosen, zone) end
      take(BL, want - #chosen, zone)
    end
  end
end

if event ~= 'stopped' then
  -- the records, the address index and the download count live as long as any peer announces
  -- (and the peer sets: a set nobody wrote to for two TTLs would take its members' expiry with it,
  -- leaving their records behind for good)
  for _, key in ipairs({P, A, D, S, L, BS, BL, O, N}) do redis.call('PEXPIRE', key, keep_ms) end
end
-- the chosen peers' records in one string: one reply element to parse
local records = ''
if #chosen > 0 then records = table.concat(redis.call('HMGET', P, unpack(chosen))) end
return {redis.call('ZCARD', S), redis.call('ZCARD', L), records}
"""

# KEYS: torrents, prefix .. 'swarm:'. ARGV: ttl us, tracker hashes (hex) to count.
_STATS = r"""
local t = redis.call('TIME')
local cutoff = string.format('%d', tonumber(t[1]) * 1000000 + tonumber(t[2]) - tonumber(ARGV[1]))
local out = {}
for i = 2, #ARGV do
  local base = KEYS[2] .. ARGV[i] .. ':'
  out[#out + 1] = redis.call('ZCOUNT', base .. 's', cutoff, '+inf')
  out[#out + 1] = redis.call('ZCOUNT', base .. 'l', cutoff, '+inf')
  out[#out + 1] = tonumber(redis.call('GET', base .. 'd') or '0')
end
return out
"""

# KEYS: torrents, the swarm base. ARGV: ttl us. Drops the swarm's expired peers; counts the rest.
_SWEEP = _COMMON + r"""
local removed = expire(now - tonumber(ARGV[1]))
return {redis.call('ZCARD', S), redis.call('ZCARD', L), removed}
"""

# KEYS: torrents, digests, cluster. ARGV: digest hex, tracker hash hex, the origin key's fingerprint.
_REGISTER = r"""
-- one cluster per prefix: two (two origin keys) would replace each other's registrations
local owner = redis.call('GET', KEYS[3])
if not owner then redis.call('SET', KEYS[3], ARGV[3]) elseif owner ~= ARGV[3] then return 0 end
local old = redis.call('HGET', KEYS[2], ARGV[1])
if old and old ~= ARGV[2] then redis.call('HDEL', KEYS[1], old) end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""

# KEYS: torrents, digests, prefix .. 'swarm:'. ARGV: digest hex.
_UNREGISTER = r"""
local ih = redis.call('HGET', KEYS[2], ARGV[1])
if not ih then return false end
redis.call('HDEL', KEYS[1], ih)
redis.call('HDEL', KEYS[2], ARGV[1])
local base = KEYS[3] .. ih .. ':'
for _, v in ipairs(redis.call('HVALS', base .. 'z')) do
  local z = string.sub(v, 1, string.find(v, '|', 1, true) - 1)
  redis.call('DEL', base .. 'zs:' .. z, base .. 'zl:' .. z, base .. 'g:' .. z, base .. 'gm:' .. z)
end
redis.call('DEL', base .. 's', base .. 'l', base .. 'p', base .. 'z', base .. 'a', base .. 'd', base .. 'bs',
           base .. 'bl', base .. 'o', base .. 'n')
return ih
"""


def _spare(peer: Peer, spare: int) -> int:
    """The script's `spare` for this announce: 0 (hand out the origins' seeders) for a stalled
    leecher, -1 (never) for one taking its share of the first copy, else the configured count."""
    if peer.is_seeder:
        return spare
    return 0 if peer.stalled else -1 if peer.first_copy else spare


def _record(peer: Peer) -> bytes:
    """A peer as the announce script keeps and returns it: '4' or '6', the compact address and
    port (BEP 23 / BEP 7), the peer id. Answers are these records end to end, parsed here once."""
    packed = ipaddress.ip_address(peer.ip).packed
    return (b"4" if len(packed) == 4 else b"6") + packed + struct.pack("!H", peer.port) + peer.peer_id


def _peers(records: bytes) -> list[tuple[str, int, bytes]]:
    peers = []
    i = 0
    while i < len(records):
        size = 4 if records[i:i + 1] == b"4" else 16
        end = i + 1 + size + 2 + 20
        if end > len(records):
            break  # cut short: nothing this script wrote
        address = str(ipaddress.ip_address(records[i + 1:i + 1 + size]))
        (port,) = struct.unpack("!H", records[i + 1 + size:i + 3 + size])
        peers.append((address, port, records[i + 3 + size:end]))
        i = end
    return peers


def client(*, host: str, port: int, db: int, username: str | None, password: str | None,
           timeout: float, max_connections: int) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool(
        max_connections=max_connections, timeout=int(max(timeout, 1)), host=host, port=port, db=db,
        username=username, password=password, socket_timeout=timeout, socket_connect_timeout=timeout,
        health_check_interval=30)
    return aioredis.Redis(connection_pool=pool)


async def _call(what: str, script: Any, keys: list[str], args: list[Any]) -> Any:
    try:
        return await script(keys=keys, args=args)
    except (RedisError, OSError) as exc:
        # the class only: a Redis error message can echo the AUTH line's arguments
        raise StoreUnavailable(f"redis {what} failed: {type(exc).__name__}") from None


async def _command(pending: Any) -> Any:
    """redis-py types its commands for both its clients (a value or an awaitable): this one's
    are awaitables."""
    return await pending


class RedisSwarms:
    def __init__(self, redis: aioredis.Redis, *, prefix: str, ttl: float, max_peers: int,
                 max_per_address: int, zone_gateways: int, origin_spare: int = ORIGIN_SPARE,
                 spare_window: float | None = None) -> None:
        self.redis = redis
        self.prefix = prefix
        self.ttl_us = int(ttl * 1_000_000)
        self.max_peers = max_peers
        self.max_per_address = max_per_address
        self.zone_gateways = zone_gateways
        self.origin_spare = origin_spare
        self.spare_window_us = int((ttl / 3 if spare_window is None else spare_window) * 1_000_000)
        self._announce = redis.register_script(_ANNOUNCE)
        self._stats = redis.register_script(_STATS)
        self._sweep = redis.register_script(_SWEEP)

    def _base(self, info_hash: bytes) -> str:
        return f"{self.prefix}swarm:{info_hash.hex()}:"

    async def announce(self, info_hash: bytes, peer: Peer, event: str, *, want: int) -> Answer | None:
        out = await _call("announce", self._announce, [f"{self.prefix}torrents", self._base(info_hash)], [
            info_hash.hex(), f"{peer.ip}|{peer.port}", peer.ip, _record(peer), int(peer.is_seeder), event,
            peer.zone, self.ttl_us, self.max_peers, self.max_per_address, want, self.zone_gateways,
            zones.reserved(want), peer.node, int(peer.origin),
            _spare(peer, self.origin_spare), SPARE_SCAN,
            self.spare_window_us, int(peer.stalled)])
        if out is None:
            return None
        return Answer(_peers(out[2]), int(out[0]), int(out[1]))

    async def stats(self, hashes: list[bytes]) -> dict[bytes, tuple[int, int, int]]:
        if not hashes:
            return {}
        out = await _call("scrape", self._stats, [f"{self.prefix}torrents", f"{self.prefix}swarm:"],
                          [self.ttl_us, *(h.hex() for h in hashes)])
        return {h: (int(out[3 * i]), int(out[3 * i + 1]), int(out[3 * i + 2])) for i, h in enumerate(hashes)}

    async def forget(self, info_hash: bytes) -> None:
        return None  # unregistering removes the swarm's keys in the same script

    async def sweep(self, registered: list[bytes]) -> Totals:
        swarms = peers = unseeded = expired = 0
        for info_hash in registered:  # one short script per swarm: Redis serves others in between
            seeders, leechers, removed = await _call(
                "sweep", self._sweep, [f"{self.prefix}torrents", self._base(info_hash)], [self.ttl_us])
            swarms += 1 if seeders + leechers else 0
            peers += seeders + leechers
            unseeded += 0 if seeders else 1
            expired += removed
        return Totals(swarms, peers, unseeded, expired)

    async def close(self) -> None:
        await self.redis.aclose()


class OtherCluster(Exception):
    """The prefix holds another cluster's registrations (another origin key)."""


class RedisTorrents:
    def __init__(self, redis: aioredis.Redis, *, prefix: str, owner: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self.owner = owner  # the fingerprint of the origin key this cluster's metainfo is signed with
        # (the metainfo itself is not kept: the announce script needs only which torrents exist)
        self._keys = [f"{prefix}{name}" for name in ("torrents", "digests")]
        self._register = redis.register_script(_REGISTER)
        self._unregister = redis.register_script(_UNREGISTER)
        self._known: OrderedDict[bytes, str] = OrderedDict()

    async def load(self, verify: Callable[[bytes, str], None]) -> None:
        return None  # nothing to load: every replica reads Redis

    async def register(self, meta: Metainfo, signature: str) -> None:
        taken = await _call("register", self._register, [*self._keys, f"{self.prefix}cluster"],
                            [meta.digest.hex, meta.tracker_hash.hex(), self.owner])
        if not taken:
            raise OtherCluster(f"redis.prefix {self.prefix!r} holds another cluster's torrents (another origin "
                               "key): give each cluster its own prefix")

    async def unregister(self, digest: Digest) -> bytes | None:
        out = await _call("unregister", self._unregister, [*self._keys, f"{self.prefix}swarm:"], [digest.hex])
        if out is None:
            return None
        info_hash = binascii.unhexlify(out)
        self._known.pop(info_hash, None)
        return info_hash

    async def digest_hex(self, info_hash: bytes) -> str | None:
        known = self._known.get(info_hash)
        if known is not None:
            # the announce script checks the registration again (an unregistration elsewhere)
            return known
        try:
            raw = await _command(self.redis.hget(self._keys[0], info_hash.hex()))
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis lookup failed: {type(exc).__name__}") from None
        if raw is None:
            return None
        digest_hex: str = raw.decode()
        self._known[info_hash] = digest_hex
        if len(self._known) > KNOWN_HASHES:
            self._known.popitem(last=False)
        return digest_hex

    async def hashes(self) -> list[bytes]:
        try:
            keys = await _command(self.redis.hkeys(self._keys[0]))
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis lookup failed: {type(exc).__name__}") from None
        return [binascii.unhexlify(k) for k in keys]

    async def count(self) -> int:
        try:
            return int(await _command(self.redis.hlen(self._keys[0])))
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis lookup failed: {type(exc).__name__}") from None

    async def ping(self) -> None:
        try:
            await self.redis.ping()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis unreachable: {type(exc).__name__}") from None
