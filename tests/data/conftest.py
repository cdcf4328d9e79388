"""Fixtures of the data tests (helpers live in dip_fixtures.py)."""

from __future__ import annotations

import numpy as np
import pytest
from dip_fixtures import make_scene


@pytest.fixture
def scene() -> tuple[np.ndarray, np.ndarray]:
    return make_scene(0, 3)
