"""Reconcile what the fetchers find with what discovery has published in the registry.

One round (``run_once``):

1. all fetchers run concurrently; 429 (honouring Retry-After) and 5xx / network errors are
   retried with bounded exponential backoff; one failing fetcher does not stop the others;
2. records are de-duplicated (one resource seen by two fetchers counts once) and named
   (``assign_names``): a published record keeps its name; a new one whose name is taken
   gets the long, deterministic name; an explicit name (a tag) that clashes, or is not a
   valid name, is not published and is reported in its fetcher's status (``unpublished``)
   and the log;
3. creates and updates are upserted; a published record is deleted only when a fetcher that
   succeeded this round owns it and no longer reports it. Records of a fetcher that failed
   this round are left exactly as they are (no update, no delete). Records no fetcher owns
   (a subscription that went away, a changed configuration) are deleted only after a round
   in which every fetcher succeeded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as _dt
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import (
    Any,
    Protocol,
    Union,
    runtime_checkable,
)

from .azure import (
    AzureCredentialError,
    AzureDiscoveryError,
    DiscoveredDatabase,
    assign_names,
    translate_error,
)

log = logging.getLogger("cachegate.discovery.reconciler")


@runtime_checkable
class Registry(Protocol):
    """Where discovery publishes. ``list_owned`` returns the records discovery published
    before (``DiscoveredDatabase`` objects, or objects with the same attributes)."""

    async def list_owned(self) -> list[Any]: ...

    async def upsert(self, record: DiscoveredDatabase) -> None: ...

    async def delete(self, name: str) -> None: ...


@runtime_checkable
class Fetcher(Protocol):
    name: str

    async def fetch(self) -> list[DiscoveredDatabase]: ...

    def owns(self, record: Any) -> bool: ...


FetcherSource = Union[Sequence[Fetcher], Callable[[], Awaitable[Sequence[Fetcher]]]]


@dataclass
class RetrySettings:
    """Bounded retries of one fetcher inside one round."""

    max_attempts: int = 4
    base_delay: float = 0.5
    max_delay: float = 10.0
    max_retry_after: float = 60.0  # a larger Retry-After is cut to this
    jitter: float = 0.1  # fraction added at random to exponential delays

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_retry_after)
        d = min(self.base_delay * (2 ** (attempt - 1)), self.max_delay)
        return d * (1 + random.uniform(0, self.jitter))


@dataclass
class FetcherStatus:
    name: str
    last_success: _dt.datetime | None = None
    last_attempt: _dt.datetime | None = None
    last_error: str | None = None  # one line
    last_error_time: _dt.datetime | None = None
    # The full message (DefaultAzureCredential's several lines, with what to check).
    last_error_detail: str | None = None
    kind: str = ""
    databases_found: int = 0
    # resources found but not published, one line each: "NAME (resource id): why"
    unpublished: list[str] = field(default_factory=list)
    consecutive_failures: int = 0
    retries: int = 0  # in the last round
    waits: list[float] = field(default_factory=list)  # seconds waited before retries, last round

    @property
    def healthy(self) -> bool:
        return self.last_error is None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("last_success", "last_attempt", "last_error_time"):
            if d[k] is not None:
                d[k] = d[k].isoformat()
        return d


@dataclass
class RunResult:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # left alone because their fetcher failed
    unpublished: list[str] = field(default_factory=list)  # found, not published: why
    failed_fetchers: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    found: int = 0
    started: float = 0.0
    finished: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed_fetchers and not self.errors


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, AzureDiscoveryError):
        return exc.one_line()
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


_COMPARED = ("name", "description", "uri", "labels", "protocol", "azure")


def _fingerprint(record: Any) -> dict[str, Any]:
    if isinstance(record, dict):
        return {k: _plain(record.get(k)) for k in _COMPARED}
    return {k: _plain(getattr(record, k, None)) for k in _COMPARED}


def _name(record: Any) -> str:
    return record["name"] if isinstance(record, dict) else record.name


def _original_name(record: Any) -> str:
    if isinstance(record, dict):
        return record.get("original_name") or (record.get("labels") or {}).get("original-name") or record["name"]
    labels = getattr(record, "labels", None) or {}
    return getattr(record, "original_name", None) or labels.get("original-name") or record.name


def _resource_id(record: Any) -> str | None:
    azure = record.get("azure") if isinstance(record, dict) else getattr(record, "azure", None)
    if azure is None:
        return None
    rid = azure.get("resource_id") if isinstance(azure, dict) else getattr(azure, "resource_id", None)
    return rid.lower() if rid else None


def _owns(fetcher: Any, record: Any) -> bool:
    owns = getattr(fetcher, "owns", None)
    if owns is None:
        return False
    try:
        return bool(owns(record))
    except Exception:  # a registry record of another shape
        return False


class Reconciler:
    def __init__(
        self,
        fetchers: FetcherSource,
        registry: Registry,
        interval: float = 300.0,
        jitter: float = 30.0,
        *,
        retry: RetrySettings | None = None,
        fetch_timeout: float = 300.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        source_name: str = "fetcher-source",
    ) -> None:
        """``fetchers``: a list, or an async callable returning the current list (e.g.
        ``AzureFetcherSet``, which follows '*' subscriptions). ``interval`` seconds between
        rounds plus up to ``jitter`` seconds at random."""
        self._source = fetchers
        self.registry = registry
        self.interval = interval
        self.jitter = jitter
        self.retry = retry or RetrySettings()
        self.fetch_timeout = fetch_timeout
        self._sleep = sleep
        self._fetchers: list[Fetcher] = list(fetchers) if not callable(fetchers) else []
        self._status: dict[str, FetcherStatus] = {}
        self.source_status = FetcherStatus(name=source_name, kind=source_name)
        self.last_result: RunResult | None = None
        self._resync = asyncio.Event()
        self._lock = asyncio.Lock()
        # Called with every failed Azure request (retried ones too): metrics.
        self.on_error: Callable[[BaseException], None] | None = None

    # ------------------------------------------------------------------ status
    def statuses(self) -> list[FetcherStatus]:
        """Per-fetcher status for the status API (current fetchers only)."""
        names = [f.name for f in self._fetchers]
        out = [self._status.setdefault(n, FetcherStatus(name=n)) for n in names]
        if callable(self._source) and self.source_status.last_attempt is not None:
            out.append(self.source_status)
        return out

    def status(self, name: str) -> FetcherStatus:
        return self._status.setdefault(name, FetcherStatus(name=name))

    def request_resync(self) -> None:
        """Wake ``run_forever`` for a round now."""
        self._resync.set()

    # ------------------------------------------------------------------ one round
    async def _current_fetchers(self) -> bool:
        """Refresh the fetcher list; False when the source failed (previous list kept)."""
        if not callable(self._source):
            return True
        st = self.source_status
        st.last_attempt = _dt.datetime.now(_dt.UTC)
        attempt = 0
        st.retries, st.waits = 0, []
        while True:
            attempt += 1
            try:
                self._fetchers = list(await asyncio.wait_for(self._source(), self.fetch_timeout))
                st.last_success, st.last_error, st.consecutive_failures = st.last_attempt, None, 0
                st.databases_found = len(self._fetchers)
                return True
            except Exception as exc:
                if await self._should_retry(st, exc, attempt):
                    continue
                self._failed(st, exc)
                self._source_error = exc
                if not isinstance(exc, AzureCredentialError):
                    log.error("discovery: cannot list what to fetch: %s", st.last_error)
                return False

    @staticmethod
    def _failed(st: FetcherStatus, exc: BaseException) -> None:
        st.last_error = _one_line(exc)
        st.last_error_detail = str(exc) if isinstance(exc, AzureDiscoveryError) else st.last_error
        st.last_error_time = _dt.datetime.now(_dt.UTC)
        st.consecutive_failures += 1

    def _log_credential_failure(self, errors: list[BaseException]) -> None:
        """No Azure credential works: say so once per round (not once per fetcher), with
        DefaultAzureCredential's own message and what to check."""
        creds = [e for e in errors if isinstance(e, AzureCredentialError)]
        if not creds:
            return
        log.error("discovery: no Azure credential works, so nothing was fetched from Azure this round "
                  "(the records already published are kept): %s", str(creds[0]),
                  extra={"fetchers_failed": len(creds)})

    def _source_failed_on_credentials(self) -> bool:
        return isinstance(getattr(self, "_source_error", None), AzureCredentialError)

    async def _should_retry(self, st: FetcherStatus, exc: BaseException, attempt: int) -> bool:
        if self.on_error is not None:
            self.on_error(exc)
        err = exc if isinstance(exc, AzureDiscoveryError) else translate_error(exc, action="")
        if not err.retryable or attempt >= self.retry.max_attempts:
            return False
        wait = self.retry.delay(attempt, err.retry_after)
        st.retries += 1
        st.waits.append(wait)
        log.info("discovery: %s: %s; retry %d in %.1fs", st.name, err.one_line(), attempt, wait)
        await self._sleep(wait)
        return True

    async def _fetch(self, fetcher: Fetcher) -> list[DiscoveredDatabase]:
        st = self.status(fetcher.name)
        st.last_attempt = _dt.datetime.now(_dt.UTC)
        st.retries, st.waits = 0, []
        attempt = 0
        while True:
            attempt += 1
            try:
                records = list(await asyncio.wait_for(fetcher.fetch(), self.fetch_timeout))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if await self._should_retry(st, exc, attempt):
                    continue
                self._failed(st, exc)
                if not isinstance(exc, AzureCredentialError):  # logged once per round instead
                    log.error("discovery: %s failed: %s", fetcher.name, st.last_error)
                raise
            st.last_success = _dt.datetime.now(_dt.UTC)
            st.last_error = None
            st.consecutive_failures = 0
            st.databases_found = len(records)
            return records

    async def run_once(self) -> RunResult:
        async with self._lock:
            return await self._run_once()

    async def _run_once(self) -> RunResult:
        result = RunResult(started=time.time())
        self._source_error: BaseException | None = None
        source_ok = await self._current_fetchers()
        fetchers = list(self._fetchers)
        if self._source_failed_on_credentials():
            # The fetchers would fail the same way: mark them so their status says why.
            outcomes: list[Any] = []
            for f in fetchers:
                self._failed(self.status(f.name), self._source_error)
                outcomes.append(self._source_error)
        else:
            outcomes = await asyncio.gather(*(self._fetch(f) for f in fetchers), return_exceptions=True)
        round_errors = [o for o in outcomes if isinstance(o, Exception)]
        if self._source_error is not None:
            round_errors.insert(0, self._source_error)
        self._log_credential_failure(round_errors)

        fresh: list[DiscoveredDatabase] = []
        found_by: dict[str, str] = {}  # resource id -> fetcher name
        seen_ids: set[str] = set()
        ok_fetchers: list[Fetcher] = []
        failed: list[Fetcher] = []
        for f, outcome in zip(fetchers, outcomes):
            if isinstance(outcome, BaseException):
                if isinstance(outcome, asyncio.CancelledError):
                    raise outcome
                failed.append(f)
                result.failed_fetchers.append(f.name)
                continue
            ok_fetchers.append(f)
            for r in outcome:
                rid = r.azure.resource_id.lower() if getattr(r, "azure", None) else None
                if rid and rid in seen_ids:
                    continue  # one resource reported by two overlapping fetchers
                if rid:
                    seen_ids.add(rid)
                    found_by[rid] = f.name
                fresh.append(r)
        if not source_ok:
            result.errors.append(f"fetcher-source: {self.source_status.last_error}")

        try:
            owned = list(await self.registry.list_owned())
        except Exception as exc:
            result.errors.append(f"registry list: {_one_line(exc)}")
            log.error("discovery: cannot read the registry: %s", _one_line(exc))
            result.finished = time.time()
            self.last_result = result
            return result

        frozen = [r for r in owned if any(_owns(f, r) for f in failed)]
        frozen_names = {_name(r) for r in frozen}
        frozen_ids = {_resource_id(r) for r in frozen}
        # A resource a frozen record stands for (seen by an overlapping fetcher) stays as it is.
        fresh = [r for r in fresh if r.azure.resource_id.lower() not in frozen_ids]
        published = {rid: _name(r) for r in owned if (rid := _resource_id(r))}
        named, problems = assign_names(fresh, published, also_taken=frozen_names)
        desired = {r.name: r for r in named}
        result.found = len(desired)
        for f in ok_fetchers:
            self.status(f.name).unpublished = []
        for r, why in problems:
            line = f"{r.original_name or r.name} ({r.azure.resource_id}): not published: {why}"
            result.unpublished.append(line)
            owner = found_by.get(r.azure.resource_id.lower())
            if owner:
                self.status(owner).unpublished.append(line)
            log.warning("discovery: %s", line)
        owned_by_name = {_name(r): r for r in owned}

        for name, record in sorted(desired.items()):
            current = owned_by_name.get(name)
            if name in frozen_names:
                log.warning("discovery: %s is held by a failing fetcher; not replacing it this round", name)
                continue
            if current is not None and _fingerprint(current) == _fingerprint(record):
                continue
            try:
                await self.registry.upsert(record)
            except Exception as exc:
                result.errors.append(f"upsert {name}: {_one_line(exc)}")
                log.error("discovery: upsert %s failed: %s", name, _one_line(exc))
                continue
            (result.updated if current is not None else result.created).append(name)

        clean_round = source_ok and not failed
        for name, record in sorted(owned_by_name.items()):
            if name in desired:
                continue
            if name in frozen_names:
                result.kept.append(name)
                continue
            owned_by_ok = any(_owns(f, record) for f in ok_fetchers)
            if not owned_by_ok and not clean_round:
                result.kept.append(name)
                continue
            try:
                await self.registry.delete(name)
            except Exception as exc:
                result.errors.append(f"delete {name}: {_one_line(exc)}")
                log.error("discovery: delete %s failed: %s", name, _one_line(exc))
                continue
            result.deleted.append(name)

        result.finished = time.time()
        self.last_result = result
        log.info(
            "discovery round: %d found, %d created, %d updated, %d deleted, %d kept, failed fetchers: %s",
            result.found,
            len(result.created),
            len(result.updated),
            len(result.deleted),
            len(result.kept),
            ", ".join(result.failed_fetchers) or "none",
            extra={"unpublished": len(result.unpublished)} if result.unpublished else None,
        )
        return result

    # ------------------------------------------------------------------ loop
    async def run_forever(self, stop_event: asyncio.Event) -> None:
        """Rounds every ``interval`` (+ jitter) seconds until ``stop_event`` is set."""
        while not stop_event.is_set():
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("discovery round failed")
            wait = self.interval + (random.uniform(0, self.jitter) if self.jitter > 0 else 0.0)
            self._resync.clear()
            stop_task = asyncio.ensure_future(stop_event.wait())
            resync_task = asyncio.ensure_future(self._resync.wait())
            try:
                await asyncio.wait({stop_task, resync_task}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (stop_task, resync_task):
                    t.cancel()
                await asyncio.gather(stop_task, resync_task, return_exceptions=True)


class InMemoryRegistry:
    """A Registry kept in a dict (tests, dry runs)."""

    def __init__(self, records: Iterable[DiscoveredDatabase] = ()) -> None:
        self.records: dict[str, DiscoveredDatabase] = {r.name: r for r in records}
        self.upserts: list[str] = []
        self.deletes: list[str] = []

    async def list_owned(self) -> list[DiscoveredDatabase]:
        return list(self.records.values())

    async def upsert(self, record: DiscoveredDatabase) -> None:
        self.records[record.name] = record
        self.upserts.append(record.name)

    async def delete(self, name: str) -> None:
        self.records.pop(name, None)
        self.deletes.append(name)
