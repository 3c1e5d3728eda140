import datetime

from cachegate.types.v1 import types_pb2 as _types_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateLockRequest(_message.Message):
    __slots__ = ("user", "role", "message", "ttl")
    USER_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    user: str
    role: str
    message: str
    ttl: _duration_pb2.Duration
    def __init__(self, user: _Optional[str] = ..., role: _Optional[str] = ..., message: _Optional[str] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class CreateLockResponse(_message.Message):
    __slots__ = ("lock",)
    LOCK_FIELD_NUMBER: _ClassVar[int]
    lock: _types_pb2.Lock
    def __init__(self, lock: _Optional[_Union[_types_pb2.Lock, _Mapping]] = ...) -> None: ...

class ListLocksRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListLocksResponse(_message.Message):
    __slots__ = ("locks", "next_page_token")
    LOCKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    locks: _containers.RepeatedCompositeFieldContainer[_types_pb2.Lock]
    next_page_token: str
    def __init__(self, locks: _Optional[_Iterable[_Union[_types_pb2.Lock, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteLockRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteLockResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchLocksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchLocksResponse(_message.Message):
    __slots__ = ("type", "lock")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    LOCK_FIELD_NUMBER: _ClassVar[int]
    type: _types_pb2.WatchEventType
    lock: _types_pb2.Lock
    def __init__(self, type: _Optional[_Union[_types_pb2.WatchEventType, str]] = ..., lock: _Optional[_Union[_types_pb2.Lock, _Mapping]] = ...) -> None: ...
