"""Deploy a finished run's router and experts on the Ray Serve of the cluster it is submitted to.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/serve.py /mnt/shared/runs/<run> --detach

The application binds 127.0.0.1 (reach it through `ray dashboard`-style port forwarding or a proxy
on the head); ``--serve.host 0.0.0.0`` exposes it to the network, which needs an API key
(``--serve.api_key``, or ``GS_RAY_API_KEY`` in the job's environment, e.g. ``--runtime-env-json
'{"env_vars": ...}'``; read by this driver, not by the replicas) unless ``--serve.allow_no_key
true`` says otherwise (see the README's serving section). With ``--detach`` the job deploys and ends
while the application keeps serving (Serve outlives the job); without it the job serves until
stopped. Run directly with no cluster it starts a local Ray and serves on 127.0.0.1:8000 until
Ctrl-C. Any ``--serve.key value`` overrides the run's ``serve`` section.
"""

import sys
from pathlib import Path

# The submitted working directory is the code that runs, even where an older gs-ray is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gs_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
