"""OpenDelta's ``opendelta.delta_models.adapter`` import path: the same names, from ``odelta_fast.methods.adapter``."""
from ..methods.adapter import *  # noqa: F401,F403
