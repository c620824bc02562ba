"""`ray job submit -- python jobs/tune.py --config jobs/configs/sweep_demo.yaml [key=value ...]`

Also `python jobs/tune.py --resume <sweep folder>` and `python jobs/tune.py recommend --sweep ... --flops 1e18`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from raylm.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["tune", *sys.argv[1:]])
