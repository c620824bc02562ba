"""`ray job submit -- python jobs/finetune.py --config jobs/configs/finetune_demo.yaml model.init_from=<model folder>`

Fine-tuning: training that starts from a trained model folder (``model.init_from``, with its tokenizer).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from raylm.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["finetune", *sys.argv[1:]])
