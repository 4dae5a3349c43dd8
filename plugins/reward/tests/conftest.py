"""Make the plugin importable when it is not installed (setup.sh installs it editable)."""

import sys
from pathlib import Path

try:
    import sdpo_reward  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
