"""`ray job submit -- python jobs/train.py --config jobs/configs/demo.yaml [key=value ...]`"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from raylm.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["train", *sys.argv[1:]])
