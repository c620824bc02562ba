"""`ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/demo.yaml [key=value ...]`

Pretraining (any training run): data -> Ray Train -> model folder -> eval -> MLflow. On a cluster, set
workdir to shared storage (s3://, gs://, or an absolute shared path); `raylm submit` does the packing.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from raylm.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["train", *sys.argv[1:]])
