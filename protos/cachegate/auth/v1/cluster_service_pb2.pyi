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

class GetClusterInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetClusterInfoResponse(_message.Message):
    __slots__ = ("cluster_name", "server_version", "ca_pin", "host_ca_pem", "user_ca_pem")
    CLUSTER_NAME_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    CA_PIN_FIELD_NUMBER: _ClassVar[int]
    HOST_CA_PEM_FIELD_NUMBER: _ClassVar[int]
    USER_CA_PEM_FIELD_NUMBER: _ClassVar[int]
    cluster_name: str
    server_version: str
    ca_pin: str
    host_ca_pem: str
    user_ca_pem: str
    def __init__(self, cluster_name: _Optional[str] = ..., server_version: _Optional[str] = ..., ca_pin: _Optional[str] = ..., host_ca_pem: _Optional[str] = ..., user_ca_pem: _Optional[str] = ...) -> None: ...

class JoinServiceRequest(_message.Message):
    __slots__ = ("token", "role", "csr_pem", "addresses", "host_id")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    token: str
    role: _types_pb2.ServiceRole
    csr_pem: str
    addresses: _containers.RepeatedScalarFieldContainer[str]
    host_id: str
    def __init__(self, token: _Optional[str] = ..., role: _Optional[_Union[_types_pb2.ServiceRole, str]] = ..., csr_pem: _Optional[str] = ..., addresses: _Optional[_Iterable[str]] = ..., host_id: _Optional[str] = ...) -> None: ...

class JoinServiceResponse(_message.Message):
    __slots__ = ("host_id", "cert_pem", "host_ca_pem", "user_ca_pem", "cluster_name")
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    CERT_PEM_FIELD_NUMBER: _ClassVar[int]
    HOST_CA_PEM_FIELD_NUMBER: _ClassVar[int]
    USER_CA_PEM_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_NAME_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    cert_pem: str
    host_ca_pem: str
    user_ca_pem: str
    cluster_name: str
    def __init__(self, host_id: _Optional[str] = ..., cert_pem: _Optional[str] = ..., host_ca_pem: _Optional[str] = ..., user_ca_pem: _Optional[str] = ..., cluster_name: _Optional[str] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("name", "holder", "expire_time", "acquire_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    ACQUIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    holder: str
    expire_time: _timestamp_pb2.Timestamp
    acquire_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., holder: _Optional[str] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., acquire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class AcquireLeaseRequest(_message.Message):
    __slots__ = ("name", "ttl")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    name: str
    ttl: _duration_pb2.Duration
    def __init__(self, name: _Optional[str] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class AcquireLeaseResponse(_message.Message):
    __slots__ = ("acquired", "lease")
    ACQUIRED_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    acquired: bool
    lease: Lease
    def __init__(self, acquired: _Optional[bool] = ..., lease: _Optional[_Union[Lease, _Mapping]] = ...) -> None: ...

class ReleaseLeaseRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ReleaseLeaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class ListLeasesRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListLeasesResponse(_message.Message):
    __slots__ = ("leases", "next_page_token")
    LEASES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    leases: _containers.RepeatedCompositeFieldContainer[Lease]
    next_page_token: str
    def __init__(self, leases: _Optional[_Iterable[_Union[Lease, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
