"""The identity bridge: raw hidden states compared as they are (the layer-selection paper's setting)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kdsearch.core.errors import ConfigError
from kdsearch.methods.bridges.base import BRIDGES, Bridge, BridgeInputs, BridgeMethod
from kdsearch.methods.losses import DISTANCES, WIDTH_FREE

if TYPE_CHECKING:
    from kdsearch.config.schema import Config


def check_identity(cfg: Config, d_student: int, d_teacher: int) -> None:
    if d_student != d_teacher and not DISTANCES.get(cfg.distill.distance).width_free:
        raise ConfigError(f"distill.bridge=identity needs equal widths (student {d_student}, teacher {d_teacher}) "
                          f"or a width-free distance ({', '.join(sorted(WIDTH_FREE))}); use projector, ted or units")


def identity_bridge(inputs: BridgeInputs) -> Bridge:
    """Compare raw states; needs d_s = d_t, unless the distance compares across widths (cka)."""
    return Bridge()


BRIDGES.register("identity")(BridgeMethod(build=identity_bridge, check=check_identity))
