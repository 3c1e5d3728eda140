"""Local HTTPS stand-in for Azure Resource Manager and Microsoft Entra ID (tests, dev cluster)."""

from .server import AzureStandin, Fault, run_standin
from .state import (
    Cache,
    EnterpriseCluster,
    EnterpriseDatabase,
    Keys,
    ManagedIdentity,
    ServicePrincipal,
    StandinConfig,
    Subscription,
    load_config,
    loads_tolerant,
)

__all__ = [
    "AzureStandin",
    "Cache",
    "EnterpriseCluster",
    "EnterpriseDatabase",
    "Fault",
    "Keys",
    "ManagedIdentity",
    "ServicePrincipal",
    "StandinConfig",
    "Subscription",
    "load_config",
    "loads_tolerant",
    "run_standin",
]
