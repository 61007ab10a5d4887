"""OpenDelta's ``opendelta.delta_models.parallel_adapter`` import path: the same names, from ``odelta_fast.methods.parallel_adapter``."""
from ..methods.parallel_adapter import *  # noqa: F401,F403
