"""The comparison with the baselines (``gs-ray eval``) on the Ray cluster it is submitted to.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/evaluate.py /mnt/shared/runs/my-run [--eval.seeds 3]

The run directory must be one a finished ``jobs/gradientspace.py`` wrote (on storage every node
sees); the table is printed and ``eval/eval.json`` written into it.
"""

import sys
from pathlib import Path

# The submitted working directory is the code that runs, even where an older gs-ray is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gs_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
