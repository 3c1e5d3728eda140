import datetime

from cachegate.types.v1 import types_pb2 as _types_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DatabaseHealthState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATABASE_HEALTH_STATE_UNSPECIFIED: _ClassVar[DatabaseHealthState]
    DATABASE_HEALTH_STATE_OK: _ClassVar[DatabaseHealthState]
    DATABASE_HEALTH_STATE_DOWN: _ClassVar[DatabaseHealthState]
DATABASE_HEALTH_STATE_UNSPECIFIED: DatabaseHealthState
DATABASE_HEALTH_STATE_OK: DatabaseHealthState
DATABASE_HEALTH_STATE_DOWN: DatabaseHealthState

class UpsertDatabaseRequest(_message.Message):
    __slots__ = ("database",)
    DATABASE_FIELD_NUMBER: _ClassVar[int]
    database: _types_pb2.Database
    def __init__(self, database: _Optional[_Union[_types_pb2.Database, _Mapping]] = ...) -> None: ...

class UpsertDatabaseResponse(_message.Message):
    __slots__ = ("database",)
    DATABASE_FIELD_NUMBER: _ClassVar[int]
    database: _types_pb2.Database
    def __init__(self, database: _Optional[_Union[_types_pb2.Database, _Mapping]] = ...) -> None: ...

class GetDatabaseRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetDatabaseResponse(_message.Message):
    __slots__ = ("database",)
    DATABASE_FIELD_NUMBER: _ClassVar[int]
    database: _types_pb2.Database
    def __init__(self, database: _Optional[_Union[_types_pb2.Database, _Mapping]] = ...) -> None: ...

class ListDatabasesRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "owner")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    owner: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., owner: _Optional[str] = ...) -> None: ...

class ListDatabasesResponse(_message.Message):
    __slots__ = ("databases", "next_page_token")
    DATABASES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    databases: _containers.RepeatedCompositeFieldContainer[_types_pb2.Database]
    next_page_token: str
    def __init__(self, databases: _Optional[_Iterable[_Union[_types_pb2.Database, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteDatabaseRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteDatabaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchDatabasesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchDatabasesResponse(_message.Message):
    __slots__ = ("type", "database")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DATABASE_FIELD_NUMBER: _ClassVar[int]
    type: _types_pb2.WatchEventType
    database: _types_pb2.Database
    def __init__(self, type: _Optional[_Union[_types_pb2.WatchEventType, str]] = ..., database: _Optional[_Union[_types_pb2.Database, _Mapping]] = ...) -> None: ...

class ReportFetcherStatusRequest(_message.Message):
    __slots__ = ("statuses", "poll_interval_seconds")
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    POLL_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedCompositeFieldContainer[_types_pb2.FetcherStatus]
    poll_interval_seconds: int
    def __init__(self, statuses: _Optional[_Iterable[_Union[_types_pb2.FetcherStatus, _Mapping]]] = ..., poll_interval_seconds: _Optional[int] = ...) -> None: ...

class ReportFetcherStatusResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListFetcherStatusesRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListFetcherStatusesResponse(_message.Message):
    __slots__ = ("hosts", "next_page_token")
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    hosts: _containers.RepeatedCompositeFieldContainer[HostFetcherStatus]
    next_page_token: str
    def __init__(self, hosts: _Optional[_Iterable[_Union[HostFetcherStatus, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class HostFetcherStatus(_message.Message):
    __slots__ = ("host_id", "statuses", "report_time", "poll_interval_seconds")
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    REPORT_TIME_FIELD_NUMBER: _ClassVar[int]
    POLL_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    statuses: _containers.RepeatedCompositeFieldContainer[_types_pb2.FetcherStatus]
    report_time: _timestamp_pb2.Timestamp
    poll_interval_seconds: int
    def __init__(self, host_id: _Optional[str] = ..., statuses: _Optional[_Iterable[_Union[_types_pb2.FetcherStatus, _Mapping]]] = ..., report_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., poll_interval_seconds: _Optional[int] = ...) -> None: ...

class DatabaseHealth(_message.Message):
    __slots__ = ("name", "state", "last_success_time", "last_failure_time", "last_error", "last_error_kind", "connect_failures", "timeouts", "auth_failures", "successes", "consecutive_failures")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_SUCCESS_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_FAILURE_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_KIND_FIELD_NUMBER: _ClassVar[int]
    CONNECT_FAILURES_FIELD_NUMBER: _ClassVar[int]
    TIMEOUTS_FIELD_NUMBER: _ClassVar[int]
    AUTH_FAILURES_FIELD_NUMBER: _ClassVar[int]
    SUCCESSES_FIELD_NUMBER: _ClassVar[int]
    CONSECUTIVE_FAILURES_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: DatabaseHealthState
    last_success_time: _timestamp_pb2.Timestamp
    last_failure_time: _timestamp_pb2.Timestamp
    last_error: str
    last_error_kind: str
    connect_failures: int
    timeouts: int
    auth_failures: int
    successes: int
    consecutive_failures: int
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[DatabaseHealthState, str]] = ..., last_success_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_failure_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_error: _Optional[str] = ..., last_error_kind: _Optional[str] = ..., connect_failures: _Optional[int] = ..., timeouts: _Optional[int] = ..., auth_failures: _Optional[int] = ..., successes: _Optional[int] = ..., consecutive_failures: _Optional[int] = ...) -> None: ...

class ProxyStatus(_message.Message):
    __slots__ = ("host_id", "heartbeat_time", "version", "start_time", "sessions", "heartbeat_interval_seconds", "databases")
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DATABASES_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    heartbeat_time: _timestamp_pb2.Timestamp
    version: str
    start_time: _timestamp_pb2.Timestamp
    sessions: int
    heartbeat_interval_seconds: int
    databases: _containers.RepeatedCompositeFieldContainer[DatabaseHealth]
    def __init__(self, host_id: _Optional[str] = ..., heartbeat_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., version: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., sessions: _Optional[int] = ..., heartbeat_interval_seconds: _Optional[int] = ..., databases: _Optional[_Iterable[_Union[DatabaseHealth, _Mapping]]] = ...) -> None: ...

class ReportProxyStatusRequest(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: ProxyStatus
    def __init__(self, status: _Optional[_Union[ProxyStatus, _Mapping]] = ...) -> None: ...

class ReportProxyStatusResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListProxyStatusesRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListProxyStatusesResponse(_message.Message):
    __slots__ = ("proxies", "next_page_token")
    PROXIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    proxies: _containers.RepeatedCompositeFieldContainer[ProxyStatus]
    next_page_token: str
    def __init__(self, proxies: _Optional[_Iterable[_Union[ProxyStatus, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
