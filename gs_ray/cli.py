"""The ``gs-ray`` command line.

gs-ray run                       every stage on the embedded default (tiny model, demo corpus)
gs-ray run --local               the single-process reference pipeline (no Ray)
gs-ray run --config run.yaml --clustering.beta 0.95 --model.name smollm2-135m
gs-ray run --resume runs/run-...  continue a run, skipping finished stages
gs-ray run --resume runs/run-... --redo router   ... and run the router (and what follows) again
gs-ray show runs/run-...          summary of a run directory
gs-ray select --target target.jsonl [--method gist|less|random] [--data pool.jsonl]
              [--budget 5%] [--run-dir runs/run-...]   targeted data selection (GIST)
gs-ray select --method gsnr [--data pool.jsonl] [--budget 5%]   G-SNR filtering (no target)
gs-ray serve runs/run-...         Ray Serve: the router and the experts over HTTP (127.0.0.1:8000)
gs-ray config                     every configuration key with its default and help
gs-ray spectra --data a.jsonl [--subset-b b.jsonl] --out DIR   layer-wise gradient spectra
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import traceback

from gs_ray import logs
from gs_ray.config import ConfigError, help_lines, load_config
from gs_ray.errors import UserError
from gs_ray.logs import setup_logging


def _parser() -> argparse.ArgumentParser:
    # --verbose is accepted before or after the command: the subcommands' copy defaults to
    # SUPPRESS so that it does not reset a --verbose given before the command.
    verbose = {"action": "store_true", "help": "on an error, show the traceback; log at DEBUG"}
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", default=argparse.SUPPRESS, **verbose)
    parser = argparse.ArgumentParser(
        prog="gs-ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", default=False, **verbose)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", parents=[common], help="run the pipeline (any --section.key value overrides config)"
    )
    run.add_argument("--config", help="YAML config file")
    run.add_argument("--output-dir", help="where run directories go (default: runs/)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue this run directory")
    run.add_argument(
        "--redo",
        metavar="STAGE[,STAGE]",
        action="append",
        default=[],
        help="with --resume: run these stages again, and every stage after them (needed where a "
        "changed --section.key would invalidate a finished stage)",
    )
    run.add_argument("--local", action="store_true", help="single-process reference pipeline")
    run.add_argument("--log-level", default="INFO")
    ev = sub.add_parser(
        "eval",
        parents=[common],
        help="compare a finished run with the baselines on its held-out split (--eval.* overrides)",
    )
    ev.add_argument("run_dir")
    ev.add_argument("--log-level", default="INFO")
    rep = sub.add_parser(
        "report", parents=[common], help="(re)build the run's HTML report (report/report.html)"
    )
    rep.add_argument("run_dir")
    sel = sub.add_parser(
        "select",
        parents=[common],
        help="rank a data pool for a target set and keep the best (--selection.* overrides)",
    )
    sel.add_argument("--target", help="the target set (.jsonl/.json/.parquet; not for gsnr)")
    sel.add_argument("--method", help="gist (default) | less | random | gsnr")
    sel.add_argument("--data", help="the pool (default: the run's data, else the demo corpus)")
    sel.add_argument("--budget", help="a percentage (5%%) or a count (default 5%%)")
    sel.add_argument(
        "--run-dir", help="reuse this run's warm-up adapter (and config); default: a new run"
    )
    sel.add_argument("--config", help="YAML config file (new runs only)")
    sel.add_argument("--output-dir", help="where a new run directory goes (default: runs/)")
    sel.add_argument("--log-level", default="INFO")
    exp = sub.add_parser(
        "export",
        parents=[common],
        help="write a finished run's deployable bundle: adapters with model cards, the router, "
        "serving configs for gs-ray serve, Ray Serve and vLLM (multi-LoRA)",
    )
    exp.add_argument("run_dir")
    exp.add_argument("out", help="the bundle's folder (must not exist)")
    show = sub.add_parser("show", parents=[common], help="summarise a run directory")
    show.add_argument("run_dir")
    sub.add_parser("config", parents=[common], help="list every configuration key")
    srv = sub.add_parser(
        "serve",
        parents=[common],
        help="deploy a finished run on Ray Serve (any --serve.key value overrides)",
    )
    srv.add_argument("run_dir")
    srv.add_argument(
        "--detach",
        action="store_true",
        help="deploy and return (on a cluster the app keeps running); default: serve until Ctrl-C",
    )
    srv.add_argument("--log-level", default="INFO")
    spec = sub.add_parser(
        "spectra",
        parents=[common],
        help="layer-wise gradient spectra (nuclear norm, effective rank) of the attention "
        "projections per sample (--model.*, --data.*, --spectra.* overrides)",
    )
    spec.add_argument("--data", required=True, help="JSONL/JSON/parquet file of subset A")
    spec.add_argument("--subset-b", help="a second file to compare with (subset B)")
    spec.add_argument("--out", required=True, help="output folder (table, summary, plots)")
    spec.add_argument("--config", help="YAML config file")
    spec.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gs-ray`` console script.

    A user error (bad config, bad data, a missing or corrupt run directory) prints one line that
    names the file or key and what is wrong, and exits with status 2; ``--verbose`` adds the
    traceback. Any other exception is a bug and keeps its traceback."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command in ("config", "show", "report", "export") and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return _command(args, rest)
    except UserError as e:
        return _report(e, args.verbose, f"gs-ray: {e.label}")


def _report(e: Exception, verbose: bool, head: str) -> int:
    """One plain message on stderr (the traceback only with --verbose); exit status 2."""
    if verbose:
        traceback.print_exception(type(e), e, e.__traceback__)
    print(f"{head}: {e}", file=sys.stderr)
    return 2


def _command(args: argparse.Namespace, rest: list[str]) -> int:
    if args.command == "config":
        print("\n".join(help_lines()))
        return 0
    if args.command == "show":
        from gs_ray.evaluation.show import show
        from gs_ray.rundir import RunDir

        RunDir.open(args.run_dir)  # a missing or corrupt run directory is a RunDirError
        print(show(args.run_dir))
        return 0
    if args.command == "export":
        from gs_ray.export import export_bundle

        print(json.dumps({"bundle": str(export_bundle(args.run_dir, args.out))}))
        return 0
    if args.command == "report":
        from gs_ray.evaluation.report import build_report

        print(json.dumps({"report": str(build_report(args.run_dir))}))
        return 0
    if args.command == "serve" or args.verbose:
        setup_logging("DEBUG" if args.verbose else args.log_level)
    if args.command == "serve":
        return _serve(args, rest)
    if args.command == "eval":
        return _eval(args, rest)
    if args.command == "spectra":
        return _spectra(args, rest)
    if args.command == "select":
        return _select(args, rest)
    cfg = _run_config(args, rest)
    # Config and data are checked before the pipeline (torch, Ray) is even imported: bad input
    # fails in a moment, with no Ray started and no run directory created.
    from gs_ray.data import check_inputs

    check_inputs(cfg)
    # Then what needs the model's config or the machine (torch, no weights), still before Ray.
    from gs_ray.preflight import check_run, log_notes

    notes = check_run(cfg, args.resume, on_ray=not args.local)
    from gs_ray import pipeline

    # The console shows gs-ray's lines; Ray's and the workers' output goes to the run's log
    # file (--verbose: everything on the console).
    with logs.capture(quiet=not args.verbose, level=args.log_level):
        log_notes(notes)
        redo = [name.strip() for arg in args.redo for name in arg.split(",") if name.strip()]
        if args.local:
            run = pipeline.run_local(cfg, resume=args.resume, checked=True, redo=redo)
        else:
            run = pipeline.run(cfg, resume=args.resume, checked=True, redo=redo)
    print(json.dumps({"run_dir": str(run.path)}))
    return 0


def _eval(args: argparse.Namespace, rest: list[str]) -> int:
    """Compare the run with the baselines; print the table; eval.json in the run directory."""
    from gs_ray.evaluation.baselines import eval_config, evaluate_run
    from gs_ray.preflight import check_eval, log_notes
    from gs_ray.rundir import RunDir

    run = RunDir.open(args.run_dir)  # a missing or corrupt run directory is a RunDirError
    notes = check_eval(eval_config(run, rest))  # encoder, eval.sts, machine: before Ray starts
    with logs.capture(quiet=not args.verbose, level=args.log_level):
        logs.attach_run(run.path)
        log_notes(notes)
        evaluate_run(run.path, rest)
    print(json.dumps({"eval": str(run.eval_json)}))
    return 0


def _spectra(args: argparse.Namespace, rest: list[str]) -> int:
    """Measure the spectra; print where the outputs went and the throughput."""
    from gs_ray.data import check_source

    cfg = load_config(args.config, rest)
    for path in filter(None, (args.data, args.subset_b)):  # bad data fails before the model loads
        check_source(dataclasses.replace(cfg.data, source=path, mix=[]), cfg.run.seed)
    from gs_ray.selection.spectra import run_spectra

    summary = run_spectra(cfg, args.data, args.out, args.subset_b)
    rates = {k: round(v["samples_per_s"], 3) for k, v in summary["subsets"].items()}
    print(json.dumps({"out": args.out, "samples_per_s": rates}))
    return 0


def _select(args: argparse.Namespace, rest: list[str]) -> int:
    """Targeted selection; prints where the selected records are."""
    from gs_ray.config import apply_overrides
    from gs_ray.rundir import RunDir

    if args.run_dir:
        if args.config:
            raise ConfigError(
                "--run-dir takes its configuration from the run directory; drop --config"
            )
        cfg = apply_overrides(RunDir.open(args.run_dir).config(), rest)
    else:
        cfg = load_config(args.config, rest)
    flags = {
        "selection.method": args.method,
        "selection.target": args.target,
        "selection.budget": args.budget,
        "data.source": args.data,
        "run.output_dir": args.output_dir,
    }
    cfg = apply_overrides(cfg, [f"--{k}={v}" for k, v in flags.items() if v is not None])
    from gs_ray.preflight import check_select, log_notes
    from gs_ray.selection.select import check_select_inputs, select

    check_select_inputs(cfg)  # config, budget, pool and target: before any model is loaded
    notes = check_select(cfg, args.run_dir)  # the machine, the target modules: before Ray
    with logs.capture(quiet=not args.verbose, level=args.log_level):
        log_notes(notes)
        run = select(cfg, args.run_dir, checked=True)
    name = cfg.selection.method
    print(
        json.dumps(
            {
                "run_dir": str(run.path),
                "selected": str(run.selection_selected(name)),
                "ranked": str(run.selection_ranked(name)),
            }
        )
    )
    return 0


def _serve(args: argparse.Namespace, rest: list[str]) -> int:
    """Deploy the run's router and experts; print the URL; serve until Ctrl-C unless --detach."""
    import time

    from ray import serve

    from gs_ray.ray_utils import STARTED_LOCAL, init_ray
    from gs_ray.serving.app import APP_NAME, app_for_run, serve_config_for
    from gs_ray.serving.pool import ServingError

    bad = [x for x in rest if x.startswith("--") and not x.startswith("--serve.")]
    if bad:
        print(f"gs-ray serve: only --serve.* overrides apply here, not {bad[0]}", file=sys.stderr)
        return 2
    try:
        from gs_ray.preflight import check_serve

        cfg = serve_config_for(args.run_dir, rest)
        check_serve(cfg)  # a device or GPU count this machine lacks: now, not a hang
        how = init_ray()
        if args.detach and how == STARTED_LOCAL:
            raise ServingError(
                "--detach needs a running cluster (RAY_ADDRESS): a local Ray "
                "started here would end with this process"
            )
        app = app_for_run(args.run_dir, cfg)
    except (UserError, ServingError) as e:
        return _report(e, args.verbose, "gs-ray serve")
    serve.start(
        http_options={
            "host": cfg.host,
            "port": cfg.port,
            "request_timeout_s": cfg.request_timeout_s,
        }
    )
    serve.run(app, name=APP_NAME, route_prefix=cfg.route_prefix)
    url = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
    print(json.dumps({"app": APP_NAME, "url": url, "run_dir": args.run_dir}), flush=True)
    logging.getLogger("gs_ray").info(
        "serving: curl -s %s/generate -H 'Content-Type: application/json' "
        '-d \'{"prompt": "What is 12 times 7?"}\'',
        url,
    )
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

        cfg = RunDir.open(args.resume).config()
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
