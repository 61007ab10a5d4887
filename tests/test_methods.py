"""Every method on every mapped architecture: forward and backward, freezing, exact detach,
exact save/load round trip, merge. Tiny random models built from config objects."""
from __future__ import annotations

import pytest

from helpers import check_method_on_architecture, method_factories
from tiny_models import ARCHITECTURES

METHODS = method_factories()


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_method_on_architecture(arch, method, tmp_path):
    check_method_on_architecture(arch, METHODS[method], tmp_path)
