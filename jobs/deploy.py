"""`ray job submit -- python jobs/deploy.py --model models:/raylm-demo/1 --config jobs/configs/demo.yaml`

Deploys the model on the cluster's Ray Serve and exits; the application keeps serving until
`serve shutdown` (or `raylm deploy` of another model under the same name replaces it).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from raylm.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["deploy", *sys.argv[1:]])
