"""OpenDelta's ``opendelta.delta_models.prefix`` import path: the same names, from ``odelta_fast.methods.prefix``."""
from ..methods.prefix import *  # noqa: F401,F403
