"""Serve replicas that listen on loopback where the Ray node does.

Ray 2.60 starts an inter-deployment gRPC server in every Serve replica, bound to ``[::]:0``
(every interface, plaintext unless ``RAY_USE_TLS``; ``ray/serve/_private/replica.py``,
``_on_initialized``), even when the deployments talk through actor calls, as gs-ray's do. On a
node whose Ray address is loopback (gs-ray's own local Ray and test clusters) anyone who can
reach the machine could call the deployments' methods there, past the API key and every
request check. ``bind_replica_grpc_to_node`` makes that server bind where the node itself
listens: 127.0.0.1 on such a node, unchanged on a cluster node (use ``RAY_USE_TLS`` there, see
docs/security.md). The deployments call it first thing in their constructors, which Ray runs
before ``_on_initialized``.
"""

from __future__ import annotations

from typing import Any

_ANY = "[::]:0"


def bind_replica_grpc_to_node() -> bool:
    """Patch this replica process's gRPC binding (idempotent); returns whether it applies (the
    node's Ray address is loopback)."""
    import ray
    from ray.serve._private import replica

    from gs_ray.local_ray import is_loopback

    if not is_loopback(ray.util.get_node_ip_address()):
        return False
    original = replica.add_port_to_grpc_server
    if getattr(original, "_gs_ray_loopback", False):
        return True

    def add_port(server: Any, address: str) -> int:
        return original(server, "127.0.0.1:0" if address == _ANY else address)

    add_port._gs_ray_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = add_port
    return True
