"""OpenDelta's ``opendelta.delta_models.low_rank_adapter`` import path: the same names, from ``odelta_fast.methods.low_rank_adapter``."""
from ..methods.low_rank_adapter import *  # noqa: F401,F403
