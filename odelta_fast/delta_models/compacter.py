"""OpenDelta's ``opendelta.delta_models.compacter`` import path: the same names, from ``odelta_fast.methods.compacter``."""
from ..methods.compacter import *  # noqa: F401,F403
