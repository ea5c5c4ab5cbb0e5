"""The ``gs-ray`` command line.

gs-ray run                       every stage on the embedded default (tiny model, demo corpus)
gs-ray run --local               the single-process reference pipeline (no Ray)
gs-ray run --config run.yaml --clustering.beta 0.95 --model.name smollm2-135m
gs-ray run --resume runs/run-...  continue a run, skipping finished stages
gs-ray show runs/run-...          summary of a run directory
gs-ray serve runs/run-...         Ray Serve: the router and the experts over HTTP (127.0.0.1:8000)
gs-ray config                     every configuration key with its default and help
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from gs_ray.config import ConfigError, help_lines, load_config


def setup_logging(level: str = "INFO") -> None:
    """Timestamped log lines; quiet the chatty libraries."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for name in ("transformers", "datasets", "urllib3", "filelock", "matplotlib"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gs-ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline (any --section.key value overrides config)")
    run.add_argument("--config", help="YAML config file")
    run.add_argument("--output-dir", help="where run directories go (default: runs/)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue this run directory")
    run.add_argument("--local", action="store_true", help="single-process reference pipeline")
    run.add_argument("--log-level", default="INFO")
    show = sub.add_parser("show", help="summarise a run directory")
    show.add_argument("run_dir")
    sub.add_parser("config", help="list every configuration key")
    srv = sub.add_parser(
        "serve", help="deploy a finished run on Ray Serve (any --serve.key value overrides)"
    )
    srv.add_argument("run_dir")
    srv.add_argument(
        "--detach",
        action="store_true",
        help="deploy and return (on a cluster the app keeps running); default: serve until Ctrl-C",
    )
    srv.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gs-ray`` console script."""
    args, rest = _parser().parse_known_args(argv)
    if args.command == "config":
        print("\n".join(help_lines()))
        return 0
    if args.command == "show":
        from gs_ray.report import show

        print(show(args.run_dir))
        return 0
    setup_logging(args.log_level)
    if args.command == "serve":
        return _serve(args, rest)
    try:
        cfg = _run_config(args, rest)
    except ConfigError as e:
        print(f"gs-ray: config error: {e}", file=sys.stderr)
        return 2
    from gs_ray import pipeline

    if args.local:
        run = pipeline.run_local(cfg, resume=args.resume)
    else:
        run = pipeline.run(cfg, resume=args.resume)
    print(json.dumps({"run_dir": str(run.path)}))
    return 0


def _serve(args: argparse.Namespace, rest: list[str]) -> int:
    """Deploy the run's router and experts; print the URL; serve until Ctrl-C unless --detach."""
    import time

    from ray import serve

    from gs_ray.ray_utils import STARTED_LOCAL, init_ray
    from gs_ray.serve_app import APP_NAME, app_for_run, serve_config_for
    from gs_ray.serving import ServingError

    bad = [x for x in rest if x.startswith("--") and not x.startswith("--serve.")]
    if bad:
        print(f"gs-ray serve: only --serve.* overrides apply here, not {bad[0]}", file=sys.stderr)
        return 2
    try:
        cfg = serve_config_for(args.run_dir, rest)
        how = init_ray()
        if args.detach and how == STARTED_LOCAL:
            raise ServingError("--detach needs a running cluster (RAY_ADDRESS): a local Ray "
                               "started here would end with this process")  # fmt: skip
        app = app_for_run(args.run_dir, cfg)
    except (ConfigError, ServingError) as e:
        print(f"gs-ray serve: {e}", file=sys.stderr)
        return 2
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(app, name=APP_NAME, route_prefix=cfg.route_prefix)
    url = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
    print(json.dumps({"app": APP_NAME, "url": url, "run_dir": args.run_dir}), flush=True)
    logging.getLogger("gs_ray").info(
        "serving: curl -s %s/generate -H 'Content-Type: application/json' "
        "-d '{\"prompt\": \"What is 12 times 7?\"}'", url,
    )  # fmt: skip
    if args.detach:
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(APP_NAME)
    return 0


def _run_config(args: argparse.Namespace, rest: list[str]):
    if args.resume:
        from gs_ray.rundir import RunDir

        cfg = RunDir(args.resume).config()
        if args.config:
            raise ConfigError(
                "--resume takes its configuration from the run directory; drop --config"
            )
        from gs_ray.config import apply_overrides

        cfg = apply_overrides(cfg, rest)
    else:
        cfg = load_config(args.config, rest)
    if args.output_dir:
        cfg.run.output_dir = args.output_dir
    return cfg


if __name__ == "__main__":
    raise SystemExit(main())
