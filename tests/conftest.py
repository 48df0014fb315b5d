"""Suite-wide fixtures. Nothing here may read or set BATCH_API_* for the tests' own process:
settings are built explicitly."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `tests.support` importable under xdist too
