"""Width bridges, one module per method, each registering its whole method in BRIDGES; `base` holds the contract.
Adding a bridge is a module here (imported below by discovery) and a space entry; a method with settings of its
own adds its config section too."""

import importlib
import pkgutil

from kdsearch.methods.bridges.base import (
    BRIDGES,
    Bridge,
    BridgeInputs,
    BridgeMethod,
    PrepareContext,
    Stack,
    bridge_method,
    bridge_sections,
    resolve_bridge,
    stack_artifact,
    stacks,
)

for _module in pkgutil.iter_modules(__path__):  # each module registers its method as it is imported
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["BRIDGES", "Bridge", "BridgeInputs", "BridgeMethod", "PrepareContext", "Stack", "bridge_method",
           "bridge_sections", "resolve_bridge", "stack_artifact", "stacks"]
