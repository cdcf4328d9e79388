"""Where the shared DreamBench copy lies for tests: ``$FOCUSDPO_DREAMBENCH``, else ``shared/`` beside the clone.

CI runs a fresh clone with ``shared/`` beside it, so the path is found from this file, not from a fixed root.
Tests that need it skip cleanly when it is absent.
"""

import os
from pathlib import Path

import pytest

DREAMBENCH = Path(os.environ.get("FOCUSDPO_DREAMBENCH",
                                 Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambench"))
needs_dreambench = pytest.mark.skipif(not (DREAMBENCH / "uno_dreambench_multiip.json").is_file()
                                      or not (DREAMBENCH / "dataset").is_dir(),
                                      reason=f"shared DreamBench copy absent ({DREAMBENCH})")
