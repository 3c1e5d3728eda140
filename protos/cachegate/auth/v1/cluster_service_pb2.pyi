from cachegate.types.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
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
