"""Ray Train as gs-ray runs it: the torch process group kept on loopback where the cluster is
gs-ray's own, and a trainer that starts no dataset manager.

Ray Train starts a run's process group with a rendezvous store (torch's TCPStore) in rank 0's
process. torch's store listens on every interface (``::``) whatever address it is given, so on
gs-ray's local Ray, where every other listener is on 127.0.0.1 and token authentication is off
(``local_ray``), each training would open a port to the network for its whole length.
``LoopbackTorchConfig`` is Ray's ``TorchConfig`` with one difference: when rank 0's node IP is
a loopback address, rank 0 first hosts the store on 127.0.0.1 alone
(``local_ray.host_loopback_store``) and the ranks join it there, gloo's own sockets on the
loopback interface too. On any other node (a real cluster) it is Ray's set-up, unchanged.

``TorchTrainerWithoutDatasets`` is Ray's ``TorchTrainer`` less the ``DatasetManager`` actor that
Ray Train V2 starts for every run, datasets or not. gs-ray gives its trainers none (the
samples travel in the loop's config), so that actor was a process per run that did nothing:
about 1.5 s of CPU to start (it imports Ray Data), and it stayed alive after its run.
"""

from __future__ import annotations

import logging
import os

import ray
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.torch.config import _TorchBackend

from gs_ray.local_ray import LOOPBACK, host_loopback_store, is_loopback

log = logging.getLogger(__name__)


def _use_loopback(addr: str, port: int) -> None:
    """In a worker: the group's address, and gloo's sockets on the loopback interface."""
    os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


class _LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        try:  # Ray's own steps of the set-up; an older Ray without them gets Ray's set-up
            from ray.train.torch.config import (
                _set_torch_distributed_env_vars,
                _setup_torch_process_group,
            )
        except ImportError:
            return super().on_start(worker_group, backend_config)
        if not is_loopback(worker_group.execute_single(0, ray.util.get_node_ip_address)):
            return super().on_start(worker_group, backend_config)
        n = len(worker_group)
        backend = backend_config.backend or (
            "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) else "gloo"
        )
        timeout_s = backend_config.timeout_s
        port = worker_group.execute_single(0, host_loopback_store, n, timeout_s)
        worker_group.execute(_use_loopback, LOOPBACK, port)
        worker_group.execute(_set_torch_distributed_env_vars)
        url = f"tcp://{LOOPBACK}:{port}"
        ray.get(
            [
                worker_group.execute_single_async(
                    i,
                    _setup_torch_process_group,
                    backend=backend,
                    world_rank=i,
                    world_size=n,
                    init_method=url,
                    timeout_s=timeout_s,
                )
                for i in range(n)
            ]
        )
        log.debug("process group of %d on %s (%s)", n, url, backend)


class LoopbackTorchConfig(TorchConfig):
    """``TorchConfig`` whose process group stays on 127.0.0.1 on a loopback node."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend


class TorchTrainerWithoutDatasets(TorchTrainer):
    """``TorchTrainer`` that starts no dataset manager when it is given no datasets (a Ray
    without Train V2's callbacks, or one that names them otherwise, gets Ray's trainer as is)."""

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        try:
            from ray.train.v2._internal.callbacks import DatasetsCallback
        except ImportError:
            return callbacks
        if self.datasets:
            return callbacks
        return [cb for cb in callbacks if not isinstance(cb, DatasetsCallback)]
