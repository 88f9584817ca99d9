"""Ray job entrypoint for `gmpatl predict` (same arguments).

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/predict.py --config configs/cluster.yaml --model models:/gmpatl/1 \
        --out /mnt/shared/predictions.parquet /mnt/shared/new-audio
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run the submitted copy of gmpatl_ray

from gmpatl_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
