"""Width bridges, one module per method (identity, projector, orthogonal, ted, units), each registering its whole
method in BRIDGES; `base` holds the contract. Adding a bridge: a module here, its config section, a space entry."""

from kdsearch.methods.bridges import (  # noqa: F401  (each registers its method)
    identity,
    orthogonal,
    projector,
    ted,
    units,
)
from kdsearch.methods.bridges.base import (
    BRIDGES,
    Bridge,
    BridgeInputs,
    BridgeMethod,
    PrepareContext,
    bridge_method,
    bridge_sections,
    resolve_bridge,
)

__all__ = ["BRIDGES", "Bridge", "BridgeInputs", "BridgeMethod", "PrepareContext", "bridge_method", "bridge_sections",
           "resolve_bridge"]
