"""The gs-ray Ray Serve application. It lives in ``gs_ray.serving.app`` (installed on every node,
so ``serve/config.yaml`` imports it from there); this module re-exports it for Serve's CLI.

    gs-ray serve runs/<run>                             # what most people want
    serve run serve/config.yaml                         # declarative (edit run_dir first)
    serve run serve.app:build_app run_dir=runs/<run>    # arguments on the command line

``build_app`` takes ``run_dir`` plus any field of the ``serve`` config section
(``max_batch_size=16``, ``expert_max_replicas=4``, ...).
"""

from gs_ray.serving.app import APP_NAME, app_for_run, build_app

__all__ = ["APP_NAME", "app_for_run", "build_app"]
