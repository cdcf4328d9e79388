"""Fixtures of the adversarial tests: the trainer tests' tiny base and toy DIP set (built once per session)."""

from __future__ import annotations

import sys
from pathlib import Path

for _helpers in ("train", "data"):  # train_fixtures (tiny overrides), dip_fixtures (synthetic scenes)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / _helpers))

from train_fixtures import one_thread, tiny_env  # noqa: E402, F401  (the trainer tests' fixtures)
