"""Dependency floors and the one constraints file (issue 24 item 9): the floors exclude the
versions with known problems, the installed stack satisfies both, and .ci/setup and every
cluster.yaml node install with the same constraints.txt."""

from __future__ import annotations

import re
import shlex
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+, as the pinned stack

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"

#: Versions below these have a known problem for gs-ray (docs/security.md says which).
FLOORS = {"torch": "2.6", "transformers": "4.56", "datasets": "4.0", "ray": "2.60"}
#: The main stack: each pinned to one exact version in constraints.txt.
PINNED = (
    "torch",
    "ray",
    "transformers",
    "peft",
    "deepspeed",
    "scikit-learn",
    "numpy",
    "datasets",
    "tokenizers",
    "safetensors",
)


def _requirements() -> dict[str, Requirement]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {Requirement(d).name: Requirement(d) for d in deps}


def _constraints() -> dict[str, Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in CONSTRAINTS.read_text().splitlines())
    return {Requirement(x).name.lower(): Requirement(x) for x in lines if x}


def test_floors_exclude_the_versions_with_known_problems():
    reqs = _requirements()
    for name, floor in FLOORS.items():
        spec = reqs[name].specifier
        just_below = Version(f"{floor}.dev0")  # before the floor's release
        assert not spec.contains(just_below, prereleases=True), (name, str(spec))
        assert spec.contains(Version(floor)), (name, str(spec))


def test_the_installed_stack_satisfies_the_floors_and_the_pins():
    pins = _constraints()
    for name in PINNED:
        spec = pins[name].specifier
        assert len(spec) == 1 and next(iter(spec)).operator == "==", (name, str(spec))
    for name, req in {**_requirements(), **pins}.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            pytest.fail(f"{name} is pinned or required but not installed")
        assert req.specifier.contains(Version(installed), prereleases=True), (name, installed)


def test_ci_setup_installs_with_the_constraints_and_restamps_when_they_change():
    setup = (ROOT / ".ci" / "setup").read_text()
    installs = [line for line in setup.splitlines() if re.search(r"pip install\b", line)]
    assert installs
    for line in installs:
        if "--upgrade pip" not in line:
            assert "-c constraints.txt" in line, line
    assert "torch==2.13.0" in setup  # the CPU build still first
    stamp = next(line for line in setup.splitlines() if line.startswith("want="))
    assert "pyproject.toml" in stamp and "constraints.txt" in stamp


def test_cluster_yaml_nodes_install_with_the_same_constraints_file():
    from gs_ray.cluster_config import CONSTRAINTS as ON_NODE
    from gs_ray.cluster_config import REPO

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert config["file_mounts"][REPO] == "."  # the repository, constraints.txt with it
    assert f"{REPO}/{CONSTRAINTS.name}" == ON_NODE
    commands = [
        c
        for key in ("setup_commands", "head_setup_commands", "worker_setup_commands")
        for c in config[key]
    ]
    installs = [part for c in commands for part in c.split("&&") if "pip install" in part]
    assert len(installs) >= 3
    for part in installs:
        if "--upgrade pip" in part:
            continue
        words = shlex.split(part)
        assert words[words.index("-c") + 1] == ON_NODE, part
    assert any(part.rstrip().endswith(" torch") for part in installs)  # the pinned version
    assert any(f"-e {REPO}" in part for part in installs)
    # Python first: the pins need 3.11, and a node without it says so.
    assert "(3, 11)" in config["setup_commands"][1].split("&&")[0]
