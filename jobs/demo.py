"""`ray job submit -- python jobs/demo.py --config jobs/configs/demo.yaml` runs the whole pipeline."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from raylm.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["demo", *sys.argv[1:]])
