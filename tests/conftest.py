"""Suite-wide setup: the tests folder is importable, so shared helpers (``shared_data``) serve every subfolder."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
