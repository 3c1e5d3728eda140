import datetime

from cachegate.auth.v1 import cluster_service_pb2 as _cluster_service_pb2
from cachegate.auth.v1 import database_service_pb2 as _database_service_pb2
from cachegate.auth.v1 import user_service_pb2 as _user_service_pb2
from cachegate.types.v1 import types_pb2 as _types_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListDatabasesRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "label_selector")
    class LabelSelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LABEL_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    label_selector: _containers.ScalarMap[str, str]
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., label_selector: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ListDatabasesResponse(_message.Message):
    __slots__ = ("databases", "next_page_token")
    DATABASES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    databases: _containers.RepeatedCompositeFieldContainer[AllowedDatabase]
    next_page_token: str
    def __init__(self, databases: _Optional[_Iterable[_Union[AllowedDatabase, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class AllowedDatabase(_message.Message):
    __slots__ = ("database", "allowed_db_users", "denied_db_users", "allowed_db_names", "denied_db_names", "health")
    DATABASE_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_DB_USERS_FIELD_NUMBER: _ClassVar[int]
    DENIED_DB_USERS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_DB_NAMES_FIELD_NUMBER: _ClassVar[int]
    DENIED_DB_NAMES_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    database: _types_pb2.Database
    allowed_db_users: _containers.RepeatedScalarFieldContainer[str]
    denied_db_users: _containers.RepeatedScalarFieldContainer[str]
    allowed_db_names: _containers.RepeatedScalarFieldContainer[str]
    denied_db_names: _containers.RepeatedScalarFieldContainer[str]
    health: _database_service_pb2.DatabaseHealth
    def __init__(self, database: _Optional[_Union[_types_pb2.Database, _Mapping]] = ..., allowed_db_users: _Optional[_Iterable[str]] = ..., denied_db_users: _Optional[_Iterable[str]] = ..., allowed_db_names: _Optional[_Iterable[str]] = ..., denied_db_names: _Optional[_Iterable[str]] = ..., health: _Optional[_Union[_database_service_pb2.DatabaseHealth, _Mapping]] = ...) -> None: ...

class GetProxySettingsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetProxySettingsResponse(_message.Message):
    __slots__ = ("redis_listen_addr", "web_listen_addr", "api_listen_addr")
    REDIS_LISTEN_ADDR_FIELD_NUMBER: _ClassVar[int]
    WEB_LISTEN_ADDR_FIELD_NUMBER: _ClassVar[int]
    API_LISTEN_ADDR_FIELD_NUMBER: _ClassVar[int]
    redis_listen_addr: str
    web_listen_addr: str
    api_listen_addr: str
    def __init__(self, redis_listen_addr: _Optional[str] = ..., web_listen_addr: _Optional[str] = ..., api_listen_addr: _Optional[str] = ...) -> None: ...

class CheckDatabaseRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class CheckStep(_message.Message):
    __slots__ = ("name", "ok", "duration", "detail")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    name: str
    ok: bool
    duration: _duration_pb2.Duration
    detail: str
    def __init__(self, name: _Optional[str] = ..., ok: _Optional[bool] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., detail: _Optional[str] = ...) -> None: ...

class CheckDatabaseResponse(_message.Message):
    __slots__ = ("name", "address", "ok", "steps", "health")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    ok: bool
    steps: _containers.RepeatedCompositeFieldContainer[CheckStep]
    health: _database_service_pb2.DatabaseHealth
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., ok: _Optional[bool] = ..., steps: _Optional[_Iterable[_Union[CheckStep, _Mapping]]] = ..., health: _Optional[_Union[_database_service_pb2.DatabaseHealth, _Mapping]] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("id", "user", "database", "db_user", "db_name", "client_addr", "start_time", "commands", "bytes_in", "bytes_out", "idle")
    ID_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    DATABASE_FIELD_NUMBER: _ClassVar[int]
    DB_USER_FIELD_NUMBER: _ClassVar[int]
    DB_NAME_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ADDR_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    COMMANDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    IDLE_FIELD_NUMBER: _ClassVar[int]
    id: str
    user: str
    database: str
    db_user: str
    db_name: str
    client_addr: str
    start_time: _timestamp_pb2.Timestamp
    commands: int
    bytes_in: int
    bytes_out: int
    idle: _duration_pb2.Duration
    def __init__(self, id: _Optional[str] = ..., user: _Optional[str] = ..., database: _Optional[str] = ..., db_user: _Optional[str] = ..., db_name: _Optional[str] = ..., client_addr: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., commands: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., idle: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions", "next_page_token")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[Session]
    next_page_token: str
    def __init__(self, sessions: _Optional[_Iterable[_Union[Session, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class TerminateSessionRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class TerminateSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
