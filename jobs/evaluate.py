"""`ray job submit -- python jobs/evaluate.py --model models:/raylm-demo/1 --config jobs/configs/demo.yaml`

Evaluates a model folder or registry URI on the configured corpus's dev split and prints the metrics as JSON.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from raylm.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["eval", *sys.argv[1:]])
