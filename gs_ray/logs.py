"""The console and the run's log file.

By default the console shows gs-ray's own lines only: a line as each stage starts and ends, the
stage summaries and progress lines for the long passes. Everything else - Ray's internal
messages, the workers' output that Ray streams to the driver, library warnings and
weight-loading bars - goes to ``RUN_DIR/logs/gs-ray.log`` (to a temporary file until the run
directory exists; its path is printed if the run fails before). ``--verbose`` (``quiet=False``)
leaves every stream on the console and logs at DEBUG.

How: the process's file descriptors 1 and 2 are pointed at the log file, so output written by
C++ (Ray's core worker), by Ray's log streaming and by any library lands there; gs-ray's console
handler writes to a saved duplicate of the original stderr. ``capture`` restores the descriptors
when it ends, so what the command prints afterwards (its JSON result) reaches stdout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

LOG_DIR = "logs"
LOG_FILE = "gs-ray.log"
_QUIET_LIBRARIES = ("transformers", "datasets", "urllib3", "filelock", "matplotlib")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _State:
    console: logging.Handler | None = None
    saved_fds: tuple[int, int] | None = None
    log_path: Path | None = None


_state = _State()


def setup_logging(level: str = "INFO") -> None:
    """Timestamped log lines on stderr; quiet the chatty libraries (verbose mode, tests)."""
    number = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(level=number, format=_FORMAT, datefmt="%H:%M:%S")
    logging.getLogger().setLevel(number)  # also when logging was configured before
    for name in _QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)


def log_path() -> Path | None:
    """Where the captured output goes now (None when nothing is captured)."""
    return _state.log_path


@contextlib.contextmanager
def capture(quiet: bool = True, level: str = "INFO") -> Iterator[None]:
    """Route output for one command: quiet (console: gs-ray's lines; the rest: the log file)
    or verbose (everything on the console, DEBUG)."""
    if not quiet:
        setup_logging("DEBUG" if level.upper() == "INFO" else level)
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    fd, tmp = tempfile.mkstemp(prefix="gs-ray-", suffix=".log")
    saved = (os.dup(1), os.dup(2))
    console_stream = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _state.saved_fds, _state.log_path = saved, Path(tmp)
    root = logging.getLogger()
    file_handler = logging.StreamHandler(sys.stderr)  # fd 2: the log file
    file_handler.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
    console = logging.StreamHandler(console_stream)
    console.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    console.addFilter(lambda record: record.name.startswith("gs_ray"))
    console.setLevel(logging.INFO)
    root.addHandler(file_handler)
    root.addHandler(console)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    for name in _QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
    _state.console = console
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in saved:
            os.close(f)
        root.removeHandler(file_handler)
        root.removeHandler(console)
        console_stream.close()
        path, _state.console, _state.saved_fds, _state.log_path = _state.log_path, None, None, None
        if path is not None and path.parent == Path(tempfile.gettempdir()):
            if failed and path.stat().st_size > 0:
                print(f"gs-ray: the full log is {path}", file=sys.stderr)
            else:  # a failure with nothing logged leaves no empty file to point at
                path.unlink(missing_ok=True)


def attach_run(run_path: str | Path) -> Path | None:
    """Move the captured output into ``run_path/logs/gs-ray.log`` (appending) and keep writing
    there. A no-op when nothing is captured (verbose mode, tests)."""
    if _state.saved_fds is None or _state.log_path is None:
        return None
    target = Path(run_path) / LOG_DIR / LOG_FILE
    if _state.log_path == target:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    with target.open("ab") as out, _state.log_path.open("rb") as old:
        shutil.copyfileobj(old, out)
    fd = os.open(target, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    if _state.log_path.parent == Path(tempfile.gettempdir()):
        _state.log_path.unlink(missing_ok=True)
    _state.log_path = target
    logging.getLogger("gs_ray").info("full log: %s", target)
    return target
