"""`?ns=` -> the configured upstream registry. Nothing else ever becomes an upstream URL."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from shoal import errors
from shoal.registry import RegistryClient


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    client: RegistryClient


class Upstreams:
    def __init__(self, upstreams: list[Upstream]) -> None:
        self._by_name = {u.name: u for u in upstreams}
        self._only = upstreams[0] if len(upstreams) == 1 else None

    def resolve(self, request: web.Request) -> Upstream:
        """The upstream a request names with `ns` (exact match only). Without `ns` the single
        configured upstream is used; with several, the request is ambiguous: 404."""
        values = request.rel_url.query.getall("ns", [])
        if len(values) > 1:
            raise errors.NotFound(errors.NAME_UNKNOWN, "ns given more than once")
        if not values:
            if self._only is None:
                raise errors.NotFound(errors.NAME_UNKNOWN,
                                      "this mirror serves several registries; the request must name one "
                                      "with ?ns=")
            return self._only
        upstream = self._by_name.get(values[0])
        if upstream is None:
            raise errors.NotFound(errors.NAME_UNKNOWN, "this mirror does not serve that registry",
                                  detail={"ns": values[0][:255]})
        return upstream

    def all(self) -> list[Upstream]:
        return list(self._by_name.values())
