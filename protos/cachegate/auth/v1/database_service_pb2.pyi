from cachegate.types.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

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
    __slots__ = ("statuses",)
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedCompositeFieldContainer[_types_pb2.FetcherStatus]
    def __init__(self, statuses: _Optional[_Iterable[_Union[_types_pb2.FetcherStatus, _Mapping]]] = ...) -> None: ...

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
    __slots__ = ("host_id", "statuses")
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    statuses: _containers.RepeatedCompositeFieldContainer[_types_pb2.FetcherStatus]
    def __init__(self, host_id: _Optional[str] = ..., statuses: _Optional[_Iterable[_Union[_types_pb2.FetcherStatus, _Mapping]]] = ...) -> None: ...
