import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ServiceRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SERVICE_ROLE_UNSPECIFIED: _ClassVar[ServiceRole]
    SERVICE_ROLE_AUTH: _ClassVar[ServiceRole]
    SERVICE_ROLE_DISCOVERY: _ClassVar[ServiceRole]
    SERVICE_ROLE_DBPROXY: _ClassVar[ServiceRole]

class IdentityKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IDENTITY_KIND_UNSPECIFIED: _ClassVar[IdentityKind]
    IDENTITY_KIND_HOST: _ClassVar[IdentityKind]
    IDENTITY_KIND_USER: _ClassVar[IdentityKind]

class DatabaseOrigin(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATABASE_ORIGIN_UNSPECIFIED: _ClassVar[DatabaseOrigin]
    DATABASE_ORIGIN_CONFIG: _ClassVar[DatabaseOrigin]
    DATABASE_ORIGIN_DYNAMIC: _ClassVar[DatabaseOrigin]
    DATABASE_ORIGIN_DISCOVERY: _ClassVar[DatabaseOrigin]

class WatchEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WATCH_EVENT_TYPE_UNSPECIFIED: _ClassVar[WatchEventType]
    WATCH_EVENT_TYPE_PUT: _ClassVar[WatchEventType]
    WATCH_EVENT_TYPE_DELETE: _ClassVar[WatchEventType]
    WATCH_EVENT_TYPE_INIT_DONE: _ClassVar[WatchEventType]
SERVICE_ROLE_UNSPECIFIED: ServiceRole
SERVICE_ROLE_AUTH: ServiceRole
SERVICE_ROLE_DISCOVERY: ServiceRole
SERVICE_ROLE_DBPROXY: ServiceRole
IDENTITY_KIND_UNSPECIFIED: IdentityKind
IDENTITY_KIND_HOST: IdentityKind
IDENTITY_KIND_USER: IdentityKind
DATABASE_ORIGIN_UNSPECIFIED: DatabaseOrigin
DATABASE_ORIGIN_CONFIG: DatabaseOrigin
DATABASE_ORIGIN_DYNAMIC: DatabaseOrigin
DATABASE_ORIGIN_DISCOVERY: DatabaseOrigin
WATCH_EVENT_TYPE_UNSPECIFIED: WatchEventType
WATCH_EVENT_TYPE_PUT: WatchEventType
WATCH_EVENT_TYPE_DELETE: WatchEventType
WATCH_EVENT_TYPE_INIT_DONE: WatchEventType

class RouteToDatabase(_message.Message):
    __slots__ = ("service_name", "protocol", "db_user", "db_name")
    SERVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    DB_USER_FIELD_NUMBER: _ClassVar[int]
    DB_NAME_FIELD_NUMBER: _ClassVar[int]
    service_name: str
    protocol: str
    db_user: str
    db_name: str
    def __init__(self, service_name: _Optional[str] = ..., protocol: _Optional[str] = ..., db_user: _Optional[str] = ..., db_name: _Optional[str] = ...) -> None: ...

class Identity(_message.Message):
    __slots__ = ("kind", "name", "service_role", "roles", "db_users", "db_names", "route", "cluster_name", "issued_at", "login_ip")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SERVICE_ROLE_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    DB_USERS_FIELD_NUMBER: _ClassVar[int]
    DB_NAMES_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_NAME_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    LOGIN_IP_FIELD_NUMBER: _ClassVar[int]
    kind: IdentityKind
    name: str
    service_role: ServiceRole
    roles: _containers.RepeatedScalarFieldContainer[str]
    db_users: _containers.RepeatedScalarFieldContainer[str]
    db_names: _containers.RepeatedScalarFieldContainer[str]
    route: RouteToDatabase
    cluster_name: str
    issued_at: _timestamp_pb2.Timestamp
    login_ip: str
    def __init__(self, kind: _Optional[_Union[IdentityKind, str]] = ..., name: _Optional[str] = ..., service_role: _Optional[_Union[ServiceRole, str]] = ..., roles: _Optional[_Iterable[str]] = ..., db_users: _Optional[_Iterable[str]] = ..., db_names: _Optional[_Iterable[str]] = ..., route: _Optional[_Union[RouteToDatabase, _Mapping]] = ..., cluster_name: _Optional[str] = ..., issued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., login_ip: _Optional[str] = ...) -> None: ...

class AzureDatabase(_message.Message):
    __slots__ = ("resource_id", "subscription_id", "resource_group", "region", "kind", "clustering_policy", "access_key_auth_disabled", "auth")
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIPTION_ID_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_GROUP_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CLUSTERING_POLICY_FIELD_NUMBER: _ClassVar[int]
    ACCESS_KEY_AUTH_DISABLED_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    resource_id: str
    subscription_id: str
    resource_group: str
    region: str
    kind: str
    clustering_policy: str
    access_key_auth_disabled: bool
    auth: str
    def __init__(self, resource_id: _Optional[str] = ..., subscription_id: _Optional[str] = ..., resource_group: _Optional[str] = ..., region: _Optional[str] = ..., kind: _Optional[str] = ..., clustering_policy: _Optional[str] = ..., access_key_auth_disabled: _Optional[bool] = ..., auth: _Optional[str] = ...) -> None: ...

class Database(_message.Message):
    __slots__ = ("name", "description", "protocol", "uri", "labels", "origin", "ca_cert_pem", "azure", "secret_ref", "owner", "tls", "update_time")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    CA_CERT_PEM_FIELD_NUMBER: _ClassVar[int]
    AZURE_FIELD_NUMBER: _ClassVar[int]
    SECRET_REF_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    TLS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    protocol: str
    uri: str
    labels: _containers.ScalarMap[str, str]
    origin: DatabaseOrigin
    ca_cert_pem: str
    azure: AzureDatabase
    secret_ref: str
    owner: str
    tls: bool
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., protocol: _Optional[str] = ..., uri: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., origin: _Optional[_Union[DatabaseOrigin, str]] = ..., ca_cert_pem: _Optional[str] = ..., azure: _Optional[_Union[AzureDatabase, _Mapping]] = ..., secret_ref: _Optional[str] = ..., owner: _Optional[str] = ..., tls: _Optional[bool] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class User(_message.Message):
    __slots__ = ("name", "roles", "db_users", "db_names", "create_time", "has_password", "totp_enabled")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    DB_USERS_FIELD_NUMBER: _ClassVar[int]
    DB_NAMES_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    HAS_PASSWORD_FIELD_NUMBER: _ClassVar[int]
    TOTP_ENABLED_FIELD_NUMBER: _ClassVar[int]
    name: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    db_users: _containers.RepeatedScalarFieldContainer[str]
    db_names: _containers.RepeatedScalarFieldContainer[str]
    create_time: _timestamp_pb2.Timestamp
    has_password: bool
    totp_enabled: bool
    def __init__(self, name: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., db_users: _Optional[_Iterable[str]] = ..., db_names: _Optional[_Iterable[str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., has_password: _Optional[bool] = ..., totp_enabled: _Optional[bool] = ...) -> None: ...

class StringList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...

class AdminRule(_message.Message):
    __slots__ = ("resources", "verbs")
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    VERBS_FIELD_NUMBER: _ClassVar[int]
    resources: _containers.RepeatedScalarFieldContainer[str]
    verbs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, resources: _Optional[_Iterable[str]] = ..., verbs: _Optional[_Iterable[str]] = ...) -> None: ...

class RoleConditions(_message.Message):
    __slots__ = ("db_labels", "db_users", "db_names", "db_commands", "rules")
    class DbLabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: StringList
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[StringList, _Mapping]] = ...) -> None: ...
    DB_LABELS_FIELD_NUMBER: _ClassVar[int]
    DB_USERS_FIELD_NUMBER: _ClassVar[int]
    DB_NAMES_FIELD_NUMBER: _ClassVar[int]
    DB_COMMANDS_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    db_labels: _containers.MessageMap[str, StringList]
    db_users: _containers.RepeatedScalarFieldContainer[str]
    db_names: _containers.RepeatedScalarFieldContainer[str]
    db_commands: _containers.RepeatedScalarFieldContainer[str]
    rules: _containers.RepeatedCompositeFieldContainer[AdminRule]
    def __init__(self, db_labels: _Optional[_Mapping[str, StringList]] = ..., db_users: _Optional[_Iterable[str]] = ..., db_names: _Optional[_Iterable[str]] = ..., db_commands: _Optional[_Iterable[str]] = ..., rules: _Optional[_Iterable[_Union[AdminRule, _Mapping]]] = ...) -> None: ...

class RoleOptions(_message.Message):
    __slots__ = ("max_session_ttl", "disconnect_expired_cert", "client_idle_timeout", "max_connections")
    MAX_SESSION_TTL_FIELD_NUMBER: _ClassVar[int]
    DISCONNECT_EXPIRED_CERT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_IDLE_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    MAX_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    max_session_ttl: _duration_pb2.Duration
    disconnect_expired_cert: bool
    client_idle_timeout: _duration_pb2.Duration
    max_connections: int
    def __init__(self, max_session_ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., disconnect_expired_cert: _Optional[bool] = ..., client_idle_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_connections: _Optional[int] = ...) -> None: ...

class Role(_message.Message):
    __slots__ = ("name", "description", "options", "allow", "deny", "builtin")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_FIELD_NUMBER: _ClassVar[int]
    DENY_FIELD_NUMBER: _ClassVar[int]
    BUILTIN_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    options: RoleOptions
    allow: RoleConditions
    deny: RoleConditions
    builtin: bool
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., options: _Optional[_Union[RoleOptions, _Mapping]] = ..., allow: _Optional[_Union[RoleConditions, _Mapping]] = ..., deny: _Optional[_Union[RoleConditions, _Mapping]] = ..., builtin: _Optional[bool] = ...) -> None: ...

class Lock(_message.Message):
    __slots__ = ("id", "user", "role", "message", "expire_time", "create_time", "created_by")
    ID_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    id: str
    user: str
    role: str
    message: str
    expire_time: _timestamp_pb2.Timestamp
    create_time: _timestamp_pb2.Timestamp
    created_by: str
    def __init__(self, id: _Optional[str] = ..., user: _Optional[str] = ..., role: _Optional[str] = ..., message: _Optional[str] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created_by: _Optional[str] = ...) -> None: ...

class ProvisionToken(_message.Message):
    __slots__ = ("id", "roles", "expire_time", "create_time", "single_use", "created_by")
    ID_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    SINGLE_USE_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    id: str
    roles: _containers.RepeatedScalarFieldContainer[ServiceRole]
    expire_time: _timestamp_pb2.Timestamp
    create_time: _timestamp_pb2.Timestamp
    single_use: bool
    created_by: str
    def __init__(self, id: _Optional[str] = ..., roles: _Optional[_Iterable[_Union[ServiceRole, str]]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., single_use: _Optional[bool] = ..., created_by: _Optional[str] = ...) -> None: ...

class AuditEvent(_message.Message):
    __slots__ = ("id", "type", "code", "time", "actor", "source_addr", "success", "error", "fields", "cluster_name")
    ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ADDR_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_NAME_FIELD_NUMBER: _ClassVar[int]
    id: str
    type: str
    code: str
    time: _timestamp_pb2.Timestamp
    actor: str
    source_addr: str
    success: bool
    error: str
    fields: _struct_pb2.Struct
    cluster_name: str
    def __init__(self, id: _Optional[str] = ..., type: _Optional[str] = ..., code: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., actor: _Optional[str] = ..., source_addr: _Optional[str] = ..., success: _Optional[bool] = ..., error: _Optional[str] = ..., fields: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., cluster_name: _Optional[str] = ...) -> None: ...

class FetcherStatus(_message.Message):
    __slots__ = ("name", "kind", "last_success_time", "last_error_time", "last_error", "databases_found", "unpublished")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LAST_SUCCESS_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    DATABASES_FOUND_FIELD_NUMBER: _ClassVar[int]
    UNPUBLISHED_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    last_success_time: _timestamp_pb2.Timestamp
    last_error_time: _timestamp_pb2.Timestamp
    last_error: str
    databases_found: int
    unpublished: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., last_success_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_error_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_error: _Optional[str] = ..., databases_found: _Optional[int] = ..., unpublished: _Optional[_Iterable[str]] = ...) -> None: ...
