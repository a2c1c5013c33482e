"""The HTTP routes between shoal's components, defined once.

Servers register these patterns in their route tables; clients (the agent, the origin's
registration, the CLI, tests and bench) build URLs from the same objects, so a path exists in
exactly one place. The mirror API (`/v2/...`) is the OCI distribution spec's: only its entry
points are listed here.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, urlencode


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    pattern: str  # aiohttp's route syntax: "{name}" is one path segment

    def path(self, **params: str) -> str:
        """The path with its segments filled in, each quoted so that a value never adds a segment
        (":" stays, as in "sha256:...")."""
        return self.pattern.format(**{k: quote(str(v), safe=":") for k, v in params.items()})

    def url(self, base: str, query: dict[str, str] | None = None, **params: str) -> str:
        url = base.rstrip("/") + self.path(**params)
        return f"{url}?{urlencode(query)}" if query else url


# The agent's mirror API: the OCI distribution spec's routes, dispatched inside the agent
MIRROR_BASE = Route("*", "/v2")
MIRROR_ROOT = Route("*", "/v2/")
MIRROR = Route("*", "/v2/{tail:.*}")

# Every component
HEALTHZ = Route("GET", "/healthz")
READYZ = Route("GET", "/readyz")
METRICS = Route("GET", "/metrics")
STATUS = Route("GET", "/v1/status")

# Origin: seeding, swarm tokens, the journal collector, audit queries, pre-seed jobs
SEED_BLOB = Route("POST", "/v1/blobs/{digest}/seed")
SWARM_TOKEN = Route("POST", "/v1/swarm/token")
JOURNAL = Route("POST", "/v1/journal")
AUDIT = Route("GET", "/v1/audit")
PRESEED = Route("POST", "/v1/preseed")
PRESEED_JOB = Route("GET", "/v1/preseed/{job}")

# Tracker: BEP 3 announce and BEP 48 scrape, and the registered metainfo
ANNOUNCE = Route("GET", "/announce")
SCRAPE = Route("GET", "/scrape")
METAINFO = Route("GET", "/v1/metainfo/{digest}")
REGISTER_METAINFO = Route("PUT", "/v1/metainfo/{digest}")
UNREGISTER_METAINFO = Route("DELETE", "/v1/metainfo/{digest}")
