"""The GradientSpace job: every stage, top to bottom, on the Ray cluster it is submitted to.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/gradientspace.py --config my-run.yaml --output-dir /mnt/shared/runs

Run directly (``python jobs/gradientspace.py``) with no cluster, it starts a local Ray itself and
runs the embedded default. Any ``gs-ray run`` option works here (``--resume RUN_DIR``,
``--section.key value`` overrides).
"""

import sys
from pathlib import Path

# The submitted working directory is the code that runs, even where an older gs-ray is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gs_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
