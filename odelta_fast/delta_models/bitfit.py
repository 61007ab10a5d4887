"""OpenDelta's ``opendelta.delta_models.bitfit`` import path: the same names, from ``odelta_fast.methods.bitfit``."""
from ..methods.bitfit import *  # noqa: F401,F403
