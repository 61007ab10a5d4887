"""OpenDelta's ``opendelta.delta_models`` import paths (``from opendelta.delta_models.adapter import
AdapterConfig`` becomes ``from odelta_fast.delta_models.adapter import AdapterConfig``); the code
lives in ``odelta_fast.methods``."""
