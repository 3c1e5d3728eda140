"""Which Azure Redis resources discovery should publish.

``AzureMatcher`` is the ``azure`` matcher of the discovery configuration::

    azure:
      - types: [redis]                 # redis = both Azure Cache for Redis and Redis Enterprise
        regions: [eastus]              # or '*'; "East US" and "eastus" are the same region
        subscriptions: ['*']           # '*' = every subscription the credential can list
        resource_groups: ['*']         # case-insensitive
        tags: {env: [prod, staging], team: 'cache-*'}   # values are globs; a list = any of
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.common.rbac import label_value_matcher, validate_label_value

from services.common.azure import KIND_ENTERPRISE, KIND_REDIS  # noqa: E402,F401
ALL_KINDS = frozenset({KIND_REDIS, KIND_ENTERPRISE})
WILDCARD = "*"

# config type name -> resource kinds it selects
_TYPE_KINDS: dict[str, frozenset[str]] = {
    "redis": ALL_KINDS,
    "redis-enterprise": frozenset({KIND_ENTERPRISE}),
}


def normalize_region(region: str | None) -> str:
    """"East US" -> "eastus", "westus2" -> "westus2"."""
    return "".join((region or "").split()).lower()


def _as_list(value: Any) -> list[str]:
    if value is None:
        return [WILDCARD]
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")] if "," in value else [value.strip()]
        return [p for p in parts if p] or [WILDCARD]
    return [str(v).strip() for v in value if str(v).strip()] or [WILDCARD]


class AzureMatcher(BaseModel):
    """Selects Azure Redis resources by kind, region, subscription, resource group and tags."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    types: list[str] = Field(default_factory=lambda: ["redis"])
    regions: list[str] = Field(default_factory=lambda: [WILDCARD])
    subscriptions: list[str] = Field(default_factory=lambda: [WILDCARD])
    resource_groups: list[str] = Field(default_factory=lambda: [WILDCARD])
    tags: dict[str, str | list[str]] = Field(default_factory=lambda: {WILDCARD: WILDCARD})

    @field_validator("types", mode="before")
    @classmethod
    def _types(cls, v: Any) -> list[str]:
        out = [t.lower() for t in _as_list(v)]
        if out == [WILDCARD]:
            return ["redis"]
        unknown = [t for t in out if t not in _TYPE_KINDS]
        if unknown:
            raise ValueError(f"unknown Azure type(s) {unknown}; use {sorted(_TYPE_KINDS)}")
        return out

    @field_validator("regions", "subscriptions", "resource_groups", mode="before")
    @classmethod
    def _lists(cls, v: Any) -> list[str]:
        return _as_list(v)

    @field_validator("tags", mode="before")
    @classmethod
    def _tags(cls, v: Any) -> dict[str, Any]:
        if v is None or v == WILDCARD:
            return {WILDCARD: WILDCARD}
        if not isinstance(v, Mapping):
            raise ValueError("tags must be a mapping of tag name to value(s)")
        out = {str(k): (str(val) if isinstance(val, (str, int, float)) else [str(x) for x in val]) for k, val in v.items()}
        for val in out.values():
            for x in [val] if isinstance(val, str) else val:
                validate_label_value(x)
        return out or {WILDCARD: WILDCARD}

    # ------------------------------------------------------------------ queries
    @property
    def kinds(self) -> frozenset[str]:
        kinds: set[str] = set()
        for t in self.types:
            kinds |= _TYPE_KINDS[t]
        return frozenset(kinds)

    def wants(self, kind: str) -> bool:
        return kind in self.kinds

    @property
    def all_subscriptions(self) -> bool:
        return WILDCARD in self.subscriptions

    @property
    def all_resource_groups(self) -> bool:
        return WILDCARD in self.resource_groups

    def match_region(self, location: str | None) -> bool:
        if WILDCARD in self.regions:
            return True
        return normalize_region(location) in {normalize_region(r) for r in self.regions}

    def match_subscription(self, subscription_id: str) -> bool:
        return self.all_subscriptions or subscription_id.lower() in {s.lower() for s in self.subscriptions}

    def match_resource_group(self, group: str) -> bool:
        return self.all_resource_groups or group.lower() in {g.lower() for g in self.resource_groups}

    def match_tags(self, tags: Mapping[str, str] | None) -> bool:
        """Every matcher entry must match. Tag names compare case-insensitively (as in Azure);
        values are matched as role label values are (exact, ``*`` globs, ``^regex$``),
        case-sensitive; a list of values means any of them."""
        tags = tags or {}
        lowered = {k.lower(): v for k, v in tags.items()}
        for key, wanted in self.tags.items():
            values = [wanted] if isinstance(wanted, str) else list(wanted)
            if key == WILDCARD:
                if WILDCARD in values:
                    continue
                candidates: Iterable[str] = tags.values()
            elif WILDCARD in key:
                key_match = label_value_matcher(key.lower())
                candidates = [v for k, v in lowered.items() if key_match(k)]
            else:
                candidates = [lowered[key.lower()]] if key.lower() in lowered else []
            preds = [label_value_matcher(p) for p in values]
            if not any(m(c or "") for c in candidates for m in preds):
                return False
        return True

    def matches(
        self,
        *,
        kind: str,
        location: str | None,
        subscription_id: str,
        resource_group: str,
        tags: Mapping[str, str] | None,
    ) -> bool:
        return (
            self.wants(kind)
            and self.match_region(location)
            and self.match_subscription(subscription_id)
            and self.match_resource_group(resource_group)
            and self.match_tags(tags)
        )

    def why_not(
        self,
        *,
        kind: str,
        location: str | None,
        subscription_id: str,
        resource_group: str,
        tags: Mapping[str, str] | None,
    ) -> str | None:
        """The first filter a resource fails, for debug logs (None when it matches)."""
        if not self.wants(kind):
            return f"type {kind} not selected"
        if not self.match_region(location):
            return f"region {normalize_region(location)} not in {self.regions}"
        if not self.match_subscription(subscription_id):
            return "subscription not selected"
        if not self.match_resource_group(resource_group):
            return f"resource group {resource_group} not in {self.resource_groups}"
        if not self.match_tags(tags):
            return "tags do not match"
        return None
