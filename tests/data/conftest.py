"""Fixtures of the data tests (helpers live in dip_fixtures.py)."""

from __future__ import annotations

import numpy as np
import pytest
from dip_fixtures import make_scene


@pytest.fixture
def scene() -> tuple[np.ndarray, np.ndarray]:
    return make_scene(0, 3)


@pytest.fixture(scope="session")
def toy_cfg():
    from focusdpo.config import load_config

    return load_config(None, ["data.shard_records=16"])


@pytest.fixture(scope="session")
def toy_set(tmp_path_factory, toy_cfg):
    """A 40-record toy DIP set (3 shards), built once per session."""
    from focusdpo.data import build_toy_dip

    out = tmp_path_factory.mktemp("toy_dip")
    build_toy_dip(toy_cfg, out, n=40, seed=3)
    return out
