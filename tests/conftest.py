"""Suite-wide setup: the tests folder is importable, so shared helpers (``shared_data``) serve every subfolder.

Tests never download: the Hugging Face hub is put in offline mode (``HF_HUB_OFFLINE=1``, unless the environment
sets it), so a hub id that is not cached fails at once, as it does on a machine without network, instead of
after the hub client's retries (``--auto-masks`` with the default ``data.mask_backend=auto`` tries its models).
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "huggingface_hub.constants" in sys.modules:  # imported before this file (a plug-in): make it see the setting
    sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = os.environ["HF_HUB_OFFLINE"].upper() in (
        "1", "ON", "YES", "TRUE")

sys.path.insert(0, str(Path(__file__).resolve().parent))
