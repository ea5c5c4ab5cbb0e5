"""The one description of gs-ray's Ray cluster, rendered as ``cluster.yaml`` (AWS) and as the
fake multi-node config the autoscaling test runs on one machine.

``SPEC`` says which node types exist, what each offers and how the autoscaler may scale them.
``render_aws`` turns it into the repository's ``cluster.yaml`` (``python -m gs_ray.cluster_config
--write`` regenerates the file; a test checks that the file equals the rendering), and
``render_fake`` into a ``provider: fake_multinode`` config with the same node types and scaling
rules, where each node is a set of local processes and the GPU is a custom resource
(``FAKE_GPU``) that a CPU machine can offer. Edit the spec here, never cluster.yaml.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gs_ray.cluster_tls import CA_CERT, CA_KEY, ray_env

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
#: The stand-in for "GPU" on fake nodes: gradient workers ask for it with
#: ``stage2.worker_resource``; a real GPU would make Ray and torch expect CUDA.
FAKE_GPU = "fake_gpu"
#: The fake provider names its head node type itself.
FAKE_HEAD_TYPE = "ray.head.default"


@dataclass(frozen=True)
class NodeType:
    """One kind of node the autoscaler knows."""

    name: str
    """The node type's key under ``available_node_types``."""
    cpus: int
    """Ray's CPU resource of such a node."""
    gpus: int = 0
    """GPUs per node (one gradient worker or one expert training each)."""
    min_workers: int = 0
    """Nodes of this type kept up even when idle (worker types only)."""
    max_workers: int = 0
    """At most this many nodes of this type (worker types only)."""
    instance_type: str = ""
    """The AWS instance type that offers ``cpus`` and ``gpus``."""

    def resources(self, gpu_name: str = "GPU") -> dict[str, int]:
        """Ray resources of the node, the GPU under ``gpu_name``."""
        return {"CPU": self.cpus, gpu_name: self.gpus}


@dataclass(frozen=True)
class ClusterSpec:
    """The cluster: a CPU head and autoscaled worker types."""

    name: str
    """``cluster_name``."""
    head: NodeType
    """The head: the driver and the centroid actor; no GPU work."""
    workers: tuple[NodeType, ...]
    """The worker node types the autoscaler adds on demand."""
    idle_timeout_minutes: float = 10
    """An idle worker node is removed after this long."""
    upscaling_speed: float = 1.0
    """How many nodes may be pending at once, relative to those running."""
    region: str = "us-west-2"
    """AWS region (and the availability zones below)."""
    availability_zones: tuple[str, ...] = ("us-west-2a", "us-west-2b")
    """AWS availability zones."""
    image_id: str = "ami-0a2363a9cff180a64"
    """AWS Deep Learning AMI (Ubuntu 22.04) in ``region``."""
    volume_gb: int = 200
    """Root volume of every node."""
    efs: str = "fs-0123456789abcdef0.efs.us-west-2.amazonaws.com"
    """Shared storage for run directories (replace with your EFS file system)."""

    @property
    def max_workers(self) -> int:
        """The cluster-wide bound: the sum of the worker types' bounds."""
        return sum(w.max_workers for w in self.workers)


SPEC = ClusterSpec(
    name="gs-ray",
    head=NodeType("head.cpu", cpus=8, instance_type="m6i.2xlarge"),
    workers=(
        NodeType(
            "worker.gpu", cpus=4, gpus=1, min_workers=0, max_workers=8, instance_type="g5.xlarge"
        ),
    ),
)

HEADER = """\
# Ray autoscaler config for gs-ray on AWS: a CPU head and an autoscaled pool of GPU workers.
# GENERATED from gs_ray/cluster_config.py (SPEC): edit that, then run
#   python -m gs_ray.cluster_config --write
# (a test checks that this file equals the rendering; the autoscaling test runs the same node
# types with Ray's fake multi-node provider).
#
#   ray up cluster.yaml                       # start the head (workers come on demand)
#   ray dashboard cluster.yaml                # forward the dashboard/job port 8265 to localhost
#   ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
#       python jobs/gradientspace.py --config my-run.yaml --output-dir /mnt/shared/runs
#   ray down cluster.yaml
#
# The head (the driver and the centroid actor) offers no GPU. Stage II starts one gradient worker
# per GPU and Stage III one Ray Train run per expert; the autoscaler adds GPU workers (up to
# max_workers) while those tasks wait and removes them after idle_timeout_minutes. Run
# directories must be on storage every node sees (the EFS mount in setup_commands): Ray Train
# writes checkpoints there and the gradient workers read the warm-up adapter from it.
# Every node installs the tested versions: pip install -c constraints.txt (the file in this
# repository, as .ci/setup does), on Python >= 3.11.
#
# Every node runs Ray with token authentication (RAY_AUTH_MODE=token): the GCS, Ray Client,
# the dashboard agents' job API and the object manager listen on the node's address, so without
# a token anyone who reaches those ports could run code. The head makes the token once
# (~/.ray/auth_token, mode 0600) and leaves a copy for the workers on the shared mount
# (/mnt/shared/.gs-ray-auth, mode 0700, root can read it: trust that mount as you trust the run
# directories on it); a worker without it fails to start. The dashboard itself listens on the
# head's loopback only: reach it through the SSH tunnel of `ray dashboard cluster.yaml`, with
# the token on your side too:
#   ray exec cluster.yaml 'cat ~/.ray/auth_token' > ~/.ray/auth_token; chmod 600 ~/.ray/auth_token
#   export RAY_AUTH_MODE=token
#
# Every node also runs Ray's gRPC with mutual TLS (RAY_USE_TLS=1): the GCS, the raylets, every
# worker and every Ray Serve replica's inter-deployment server (which listens on all interfaces)
# accept only peers with a certificate of this cluster. The head makes the cluster's CA once
# (~/.gs-ray-tls, python -m gs_ray.cluster_tls ca) and leaves it beside the token for the
# workers; every node makes its own key and certificate for its address (cluster_tls node) before
# ray start, and its shells get the same settings (~/.bashrc), so a driver started there
# (ray attach, ray exec) connects too. A Ray Client from outside the cluster needs a node
# certificate of its own: use `ray job submit` through the dashboard tunnel instead.
"""

REPO = "/home/ubuntu/gs-ray"  # where file_mounts puts this repository on every node
#: The tested versions (the repository's constraints.txt, which .ci/setup uses too): every pip
#: install on a node is constrained to them.
CONSTRAINTS = f"{REPO}/constraints.txt"
#: The pins need Python >= 3.11 (numpy, scikit-learn, transformers): a node without it stops in
#: its setup with this message rather than with a resolver error.
PYTHON_CHECK = (
    "python3 -c 'import sys; sys.exit(sys.version_info < (3, 11) and "
    '"gs-ray: constraints.txt needs Python >= 3.11")\''
)
TOKEN = "~/.ray/auth_token"  # where Ray 2.60 reads its cluster token
SHARED_TOKEN_DIR = "/mnt/shared/.gs-ray-auth"  # the head's copy for the workers
TLS_DIR = "$HOME/.gs-ray-tls"  # the node's CA copy, key and certificate (gs_ray.cluster_tls)
TLS_ENV = " ".join(f"{k}={v}" for k, v in ray_env(TLS_DIR).items())  # mutual TLS, for a shell
#: Before every ray start: token authentication and mutual TLS.
AUTH = f"export RAY_AUTH_MODE=token {TLS_ENV}; "
#: The node's shells get the same settings, so that a driver started there connects (once).
TLS_SHELL = (
    f"grep -qs RAY_USE_TLS ~/.bashrc || echo 'export RAY_AUTH_MODE=token {TLS_ENV}' >> ~/.bashrc"
)


def _aws_node(spec: ClusterSpec, node: NodeType, worker: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if worker:
        out.update(min_workers=node.min_workers, max_workers=node.max_workers)
    out["resources"] = node.resources()
    out["node_config"] = {
        "InstanceType": node.instance_type,
        "ImageId": spec.image_id,
        "BlockDeviceMappings": [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": spec.volume_gb}}],
    }
    return out


def aws_config(spec: ClusterSpec = SPEC) -> dict[str, Any]:
    """The AWS autoscaler config as a dict."""
    venv = "~/venv/bin"
    pip = f"{venv}/pip install -q -c {CONSTRAINTS}"
    return {
        "cluster_name": spec.name,
        "max_workers": spec.max_workers,
        "upscaling_speed": spec.upscaling_speed,
        "idle_timeout_minutes": spec.idle_timeout_minutes,
        "provider": {
            "type": "aws",
            "region": spec.region,
            "availability_zone": ",".join(spec.availability_zones),
            "cache_stopped_nodes": False,
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            spec.head.name: _aws_node(spec, spec.head, worker=False),
            **{w.name: _aws_node(spec, w, worker=True) for w in spec.workers},
        },
        "head_node_type": spec.head.name,
        "file_mounts": {REPO: "."},  # the code, and constraints.txt with it
        "rsync_exclude": [".venv", "runs", "**/__pycache__"],
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "initialization_commands": [],
        "setup_commands": [
            "sudo mkdir -p /mnt/shared && (mountpoint -q /mnt/shared || sudo mount -t nfs4 -o "
            f"nfsvers=4.1 {spec.efs}:/ /mnt/shared || true)",
            f"{PYTHON_CHECK} && python3 -m venv ~/venv && {venv}/pip install -q --upgrade pip",
            f"{pip} torch",  # the pinned version's CUDA build on GPU nodes, before the rest
            f"{pip} -e {REPO}",
            "echo 'source ~/venv/bin/activate' >> ~/.bashrc",
        ],
        "head_setup_commands": [
            f"{pip} 'boto3>=1.4.8'",
            # the cluster's token: made once on the head, private to its user
            f"mkdir -p ~/.ray && chmod 700 ~/.ray && (test -s {TOKEN} || (umask 077 && python3 "
            f"-c 'import secrets; print(secrets.token_hex(32))' > {TOKEN})) && chmod 600 {TOKEN}",
            f"sudo install -d -m 700 -o $(id -u) -g $(id -g) {SHARED_TOKEN_DIR} && install -m 600 "
            f"{TOKEN} {SHARED_TOKEN_DIR}/ray_auth_token",
            # the cluster's CA: made once on the head, left beside the token for the workers
            f"{venv}/python -m gs_ray.cluster_tls ca {TLS_DIR} && install -m 600 "
            f"{TLS_DIR}/{CA_CERT} {TLS_DIR}/{CA_KEY} {SHARED_TOKEN_DIR}/",
            f"{venv}/python -m gs_ray.cluster_tls node {TLS_DIR}",
            TLS_SHELL,
        ],
        "worker_setup_commands": [
            f"mkdir -p ~/.ray && chmod 700 ~/.ray && install -m 600 "
            f"{SHARED_TOKEN_DIR}/ray_auth_token {TOKEN}",
            f"install -d -m 700 {TLS_DIR} && install -m 600 {SHARED_TOKEN_DIR}/{CA_CERT} "
            f"{SHARED_TOKEN_DIR}/{CA_KEY} {TLS_DIR}/",
            f"{venv}/python -m gs_ray.cluster_tls node {TLS_DIR}",
            TLS_SHELL,
        ],
        "head_start_ray_commands": [
            f"{venv}/ray stop",
            f"ulimit -n 65536; {AUTH}{venv}/ray start --head --port=6379 "
            "--object-manager-port=8076 --autoscaling-config=~/ray_bootstrap_config.yaml "
            "--dashboard-host=127.0.0.1",
        ],
        "worker_start_ray_commands": [
            f"{venv}/ray stop",
            f"ulimit -n 65536; {AUTH}{venv}/ray start --address=$RAY_HEAD_IP:6379 "
            "--object-manager-port=8076",
        ],
    }


def render_aws(spec: ClusterSpec = SPEC) -> str:
    """The text of ``cluster.yaml``."""
    body = yaml.safe_dump(aws_config(spec), sort_keys=False, width=1000, default_flow_style=False)
    return HEADER + "\n" + body


def render_fake(
    spec: ClusterSpec = SPEC,
    *,
    gcs_address: str | None = None,
    cpus_per_node: int = 1,
    head_cpus: int = 1,
    max_workers: int | None = None,
    idle_timeout_minutes: float = 0.1,
) -> dict[str, Any]:
    """The same node types for Ray's ``fake_multinode`` provider (nodes are local processes).

    Scaled to one machine: every worker node offers ``cpus_per_node`` CPUs and its GPUs as
    ``FAKE_GPU``; ``max_workers`` caps each worker type (default: the spec's bound); idle
    nodes go after ``idle_timeout_minutes``. ``gcs_address`` is where fake nodes join (the
    head's 127.0.0.1 port; Ray's default would be the machine's address on port 6379).
    """
    # Every fake node reports 127.0.0.1: the autoscaler must tell them apart by node id, or it
    # sees no node as used and ends them all after the idle timeout. No SSH updaters run, and
    # the launch config cannot be checked (there is none).
    provider: dict[str, Any] = {
        "type": "fake_multinode",
        "use_node_id_as_ip": True,
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
    }
    if gcs_address:
        provider["gcs_address"] = gcs_address
    types: dict[str, Any] = {
        FAKE_HEAD_TYPE: {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0}
    }
    for w in spec.workers:
        cap = w.max_workers if max_workers is None else min(w.max_workers, max_workers)
        types[w.name] = {
            "min_workers": min(w.min_workers, cap),
            "max_workers": cap,
            "resources": {"CPU": cpus_per_node, FAKE_GPU: w.gpus},
            "node_config": {},
        }
    return {
        "cluster_name": f"{spec.name}-fake",
        "max_workers": sum(t.get("max_workers", 0) for t in types.values()),
        "upscaling_speed": spec.upscaling_speed,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": provider,
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": types,
        "head_node_type": FAKE_HEAD_TYPE,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def main(argv: list[str] | None = None) -> int:
    """``--write``: regenerate cluster.yaml; ``--check``: fail if it differs; else print it."""
    ap = argparse.ArgumentParser(prog="python -m gs_ray.cluster_config", description=__doc__)
    ap.add_argument("--write", action="store_true", help=f"write {CLUSTER_YAML.name}")
    ap.add_argument("--check", action="store_true", help="exit 1 if it differs from SPEC")
    ap.add_argument("--fake", action="store_true", help="print the fake multi-node config")
    args = ap.parse_args(argv)
    if args.fake:
        print(yaml.safe_dump(render_fake(), sort_keys=False), end="")
        return 0
    text = render_aws()
    if args.write:
        CLUSTER_YAML.write_text(text)
        print(f"wrote {CLUSTER_YAML}")
    elif args.check:
        if CLUSTER_YAML.read_text() != text:
            print(f"{CLUSTER_YAML} differs from gs_ray/cluster_config.py: run --write")
            return 1
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
