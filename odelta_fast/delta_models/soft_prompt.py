"""OpenDelta's ``opendelta.delta_models.soft_prompt`` import path: the same names, from ``odelta_fast.methods.soft_prompt``."""
from ..methods.soft_prompt import *  # noqa: F401,F403
