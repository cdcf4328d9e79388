"""The default world, built once for the world tests (its 600 identities take a moment)."""

import pytest

from focusdpo.config import WorldConfig
from focusdpo.world import World


@pytest.fixture(scope="session")
def world() -> World:
    return World(WorldConfig())
