"""The rules of the house (docs/architecture.md, "Rules of the house"), checked on the source.

Every ``import`` of every module under gs_ray/ counts, the ones inside functions too (a lazy
import is still a dependency). A new import that crosses a layer fails here with the module and
the rule named; an exception that is meant goes into ``CROSSINGS`` and into docs/architecture.md.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gs_ray"

# Modules that import no Ray and only each other: anything may import them.
BASE = (
    "gs_ray.core",
    "gs_ray.data",
    "gs_ray.config",
    "gs_ray.errors",
    "gs_ray.io",
    "gs_ray.statefile",
    "gs_ray.rundir",
    "gs_ray.progress",
    "gs_ray.logs",
    "gs_ray.tracking",
    "gs_ray.faults",
)
# What a stage's sub-package may import besides BASE and its own modules.
SHARED = ("gs_ray.prepare", "gs_ray.ray_utils", "gs_ray.local_ray")
STAGES = (
    "gs_ray.training",
    "gs_ray.stage2",
    "gs_ray.routing",
    "gs_ray.evaluation",
    "gs_ray.selection",
    "gs_ray.serving",
)
# Entry points: they may import anything, and nothing imports them but each other.
ENTRY = ("gs_ray.pipeline", "gs_ray.cli")
# Every import of one stage's module by a module outside that stage (importer -> the modules it
# may import). No module import goes in a circle (the last test).
CROSSINGS = {
    "gs_ray.training.tuning": {
        "gs_ray.stage2.computer",
        "gs_ray.stage2.launch",
        "gs_ray.routing.encoder",
        "gs_ray.routing.routability",
        "gs_ray.routing.router",
    },
    "gs_ray.routing.stage": {"gs_ray.training.loop"},
    "gs_ray.evaluation.analyses": {
        "gs_ray.routing.encoder",
        "gs_ray.stage2.computer",
        "gs_ray.stage2.launch",
    },
    "gs_ray.evaluation.baselines": {
        "gs_ray.routing.router",
        "gs_ray.routing.stage",
        "gs_ray.training.ray_train",
        "gs_ray.training.pretrain",
    },
    "gs_ray.evaluation.methods": {"gs_ray.routing.encoder", "gs_ray.routing.fallback"},
    "gs_ray.evaluation.scorer": {"gs_ray.training.loop"},
    "gs_ray.evaluation.heldout": {
        "gs_ray.routing.router",
        "gs_ray.routing.fallback",
        "gs_ray.training.loop",
    },
    "gs_ray.evaluation.show": {"gs_ray.routing.router"},
    "gs_ray.serving.pool": {"gs_ray.routing.router", "gs_ray.routing.fallback"},
    "gs_ray.selection.consumers": {"gs_ray.stage2.consumers"},
    "gs_ray.selection.gsnr": {"gs_ray.stage2.computer", "gs_ray.training.ray_train"},
    "gs_ray.selection.select": {
        "gs_ray.stage2.batch",
        "gs_ray.stage2.computer",
        "gs_ray.stage2.consumers",
        "gs_ray.stage2.plan",
        "gs_ray.training.pretrain",
        "gs_ray.training.warmup",
    },
    "gs_ray.selection.spectra": {"gs_ray.training.pretrain"},
    "gs_ray.export": {"gs_ray.evaluation.compare", "gs_ray.serving.pool"},
    "gs_ray.preflight": {"gs_ray.routing.encoder"},
}


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module -> every module it imports (gs_ray's own and ray), at any depth of the file; a
    ``from gs_ray.x import y`` names gs_ray.x.y where y is a module, else gs_ray.x."""
    modules = {_module(p) for p in PACKAGE.rglob("*.py")}
    out: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    found.add(sub if sub in modules else node.module)
        out[_module(path)] = {n for n in found if n.split(".")[0] in ("gs_ray", "ray")}
    return out


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _stage(name: str) -> str | None:
    return next((s for s in STAGES if _within(name, (s,))), None)


IMPORTS = _imports()


def test_the_walk_sees_the_package():
    assert len(IMPORTS) > 60
    assert "gs_ray.stage2.computer" in IMPORTS["gs_ray.training.tuning"]  # a lazy import
    assert "ray" in IMPORTS["gs_ray.ray_utils"]


def test_base_modules_import_no_ray_and_nothing_above_them():
    bad = [
        f"{m} imports {n}"
        for m, names in IMPORTS.items()
        if _within(m, BASE)
        for n in names
        if n.split(".")[0] == "ray" or not _within(n, BASE)
    ]
    assert not bad, bad


def test_shared_modules_import_no_stage():
    bad = [
        f"{m} imports {n}"
        for m, names in IMPORTS.items()
        if _within(m, SHARED)
        for n in names
        if _stage(n) or _within(n, ENTRY)
    ]
    assert not bad, bad


def test_stages_cross_only_where_the_architecture_says():
    bad = []
    for m, names in IMPORTS.items():
        if _within(m, ENTRY):
            continue
        for n in names:
            if _within(n, ENTRY):
                bad.append(f"{m} imports the entry point {n}")
            elif (
                _stage(n)
                and _stage(n) != _stage(m)
                and not any(_within(n, (ok,)) for ok in CROSSINGS.get(m, ()))
            ):
                bad.append(f"{m} imports {n}: not in CROSSINGS (docs/architecture.md)")
    assert not bad, bad


def test_crossings_are_real_and_no_import_goes_in_a_circle():
    for m, allowed in CROSSINGS.items():
        assert m in IMPORTS, f"{m}: no such module"
        for n in allowed:
            assert n in IMPORTS[m] or any(i.startswith(n + ".") for i in IMPORTS[m]), (
                f"{m} no longer imports {n}: drop it from CROSSINGS and the docs"
            )
    # No circle among the modules, lazy imports included (a lazy import that breaks a circle at
    # import time still ties the two modules both ways).
    graph = {m: {n for n in ns if n in IMPORTS and n != m} for m, ns in IMPORTS.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, f"an import circle: {' -> '.join(path + [m, n])}"
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_a_gradient_worker_process_imports_no_scikit_learn():
    """A gradient worker (started once per worker of every Stage II) loads its actor's module
    and the gradient engine, and with them only the cosine geometry of core/cosine.py: not the
    clusterer's scikit-learn (about 1.3 s of import, docs/architecture.md). In a fresh process."""
    code = (
        "import sys\n"
        "import gs_ray.stage2.worker, gs_ray.stage2.computer\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'scipy', 'pandas'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "sklearn" not in out.stdout.splitlines()[-1], out.stdout
