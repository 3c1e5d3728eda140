import datetime

from cachegate.types.v1 import types_pb2 as _types_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateUserRequest(_message.Message):
    __slots__ = ("user",)
    USER_FIELD_NUMBER: _ClassVar[int]
    user: _types_pb2.User
    def __init__(self, user: _Optional[_Union[_types_pb2.User, _Mapping]] = ...) -> None: ...

class CreateUserResponse(_message.Message):
    __slots__ = ("user", "invite")
    USER_FIELD_NUMBER: _ClassVar[int]
    INVITE_FIELD_NUMBER: _ClassVar[int]
    user: _types_pb2.User
    invite: Invite
    def __init__(self, user: _Optional[_Union[_types_pb2.User, _Mapping]] = ..., invite: _Optional[_Union[Invite, _Mapping]] = ...) -> None: ...

class Invite(_message.Message):
    __slots__ = ("token", "expire_time")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    token: str
    expire_time: _timestamp_pb2.Timestamp
    def __init__(self, token: _Optional[str] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetUserRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetUserResponse(_message.Message):
    __slots__ = ("user",)
    USER_FIELD_NUMBER: _ClassVar[int]
    user: _types_pb2.User
    def __init__(self, user: _Optional[_Union[_types_pb2.User, _Mapping]] = ...) -> None: ...

class ListUsersRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListUsersResponse(_message.Message):
    __slots__ = ("users", "next_page_token")
    USERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    users: _containers.RepeatedCompositeFieldContainer[_types_pb2.User]
    next_page_token: str
    def __init__(self, users: _Optional[_Iterable[_Union[_types_pb2.User, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UpdateUserRequest(_message.Message):
    __slots__ = ("user", "update_mask")
    USER_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    user: _types_pb2.User
    update_mask: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, user: _Optional[_Union[_types_pb2.User, _Mapping]] = ..., update_mask: _Optional[_Iterable[str]] = ...) -> None: ...

class UpdateUserResponse(_message.Message):
    __slots__ = ("user",)
    USER_FIELD_NUMBER: _ClassVar[int]
    user: _types_pb2.User
    def __init__(self, user: _Optional[_Union[_types_pb2.User, _Mapping]] = ...) -> None: ...

class DeleteUserRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteUserResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResetUserRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ResetUserResponse(_message.Message):
    __slots__ = ("invite",)
    INVITE_FIELD_NUMBER: _ClassVar[int]
    invite: Invite
    def __init__(self, invite: _Optional[_Union[Invite, _Mapping]] = ...) -> None: ...

class RedeemInviteRequest(_message.Message):
    __slots__ = ("invite_token", "password", "totp_secret", "totp_code")
    INVITE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    TOTP_SECRET_FIELD_NUMBER: _ClassVar[int]
    TOTP_CODE_FIELD_NUMBER: _ClassVar[int]
    invite_token: str
    password: str
    totp_secret: str
    totp_code: str
    def __init__(self, invite_token: _Optional[str] = ..., password: _Optional[str] = ..., totp_secret: _Optional[str] = ..., totp_code: _Optional[str] = ...) -> None: ...

class RedeemInviteResponse(_message.Message):
    __slots__ = ("user",)
    USER_FIELD_NUMBER: _ClassVar[int]
    user: str
    def __init__(self, user: _Optional[str] = ...) -> None: ...

class LoginRequest(_message.Message):
    __slots__ = ("user", "password", "totp_code", "csr_pem", "ttl")
    USER_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    TOTP_CODE_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    user: str
    password: str
    totp_code: str
    csr_pem: str
    ttl: _duration_pb2.Duration
    def __init__(self, user: _Optional[str] = ..., password: _Optional[str] = ..., totp_code: _Optional[str] = ..., csr_pem: _Optional[str] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class LoginResponse(_message.Message):
    __slots__ = ("cert_pem", "user_ca_pem", "host_ca_pem", "identity", "expire_time")
    CERT_PEM_FIELD_NUMBER: _ClassVar[int]
    USER_CA_PEM_FIELD_NUMBER: _ClassVar[int]
    HOST_CA_PEM_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    cert_pem: str
    user_ca_pem: str
    host_ca_pem: str
    identity: _types_pb2.Identity
    expire_time: _timestamp_pb2.Timestamp
    def __init__(self, cert_pem: _Optional[str] = ..., user_ca_pem: _Optional[str] = ..., host_ca_pem: _Optional[str] = ..., identity: _Optional[_Union[_types_pb2.Identity, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GenerateDatabaseCertRequest(_message.Message):
    __slots__ = ("csr_pem", "route", "ttl")
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    csr_pem: str
    route: _types_pb2.RouteToDatabase
    ttl: _duration_pb2.Duration
    def __init__(self, csr_pem: _Optional[str] = ..., route: _Optional[_Union[_types_pb2.RouteToDatabase, _Mapping]] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class GenerateDatabaseCertResponse(_message.Message):
    __slots__ = ("cert_pem", "user_ca_pem", "host_ca_pem", "expire_time")
    CERT_PEM_FIELD_NUMBER: _ClassVar[int]
    USER_CA_PEM_FIELD_NUMBER: _ClassVar[int]
    HOST_CA_PEM_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    cert_pem: str
    user_ca_pem: str
    host_ca_pem: str
    expire_time: _timestamp_pb2.Timestamp
    def __init__(self, cert_pem: _Optional[str] = ..., user_ca_pem: _Optional[str] = ..., host_ca_pem: _Optional[str] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class WatchUsersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UserAccess(_message.Message):
    __slots__ = ("name", "roles", "db_users", "db_names")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    DB_USERS_FIELD_NUMBER: _ClassVar[int]
    DB_NAMES_FIELD_NUMBER: _ClassVar[int]
    name: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    db_users: _containers.RepeatedScalarFieldContainer[str]
    db_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., db_users: _Optional[_Iterable[str]] = ..., db_names: _Optional[_Iterable[str]] = ...) -> None: ...

class WatchUsersResponse(_message.Message):
    __slots__ = ("type", "user")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    type: _types_pb2.WatchEventType
    user: UserAccess
    def __init__(self, type: _Optional[_Union[_types_pb2.WatchEventType, str]] = ..., user: _Optional[_Union[UserAccess, _Mapping]] = ...) -> None: ...
