"""OpenDelta's ``opendelta.delta_models.lora`` import path: the same names, from ``odelta_fast.methods.lora``."""
from ..methods.lora import *  # noqa: F401,F403
