"""Loopback-only Ray: the marker `serving.local_ray` sets for the Ray processes it starts, and
the one Serve socket no Ray setting covers.

Serve 2.60 starts an inter-deployment gRPC server in every replica, bound to "[::]:0" in
ray/serve/_private/replica.py (after the deployment's constructor returns), with no setting for
its address. In a loopback-only instance our deployments' constructors call
`keep_replica_grpc_on_loopback`, which makes that bind 127.0.0.1; elsewhere (a cluster, the
tests' in-process instance) it does nothing.
"""

import os

LOOPBACK = "127.0.0.1"
LOOPBACK_ENV = "MCTI_RAY_LOOPBACK"  # "1" in every process of a loopback-only instance


def keep_replica_grpc_on_loopback() -> None:
    """In a replica of a loopback-only instance: Serve's inter-deployment gRPC server binds
    127.0.0.1 instead of "[::]" (the replica module looks the function up when it starts it)."""
    if os.environ.get(LOOPBACK_ENV) != "1":
        return
    from ray.serve._private import replica

    bind = replica.add_port_to_grpc_server
    if getattr(bind, "on_loopback", False):
        return

    def bind_on_loopback(server, address: str):
        return bind(server, address.replace("[::]", LOOPBACK, 1))

    bind_on_loopback.on_loopback = True
    replica.add_port_to_grpc_server = bind_on_loopback
