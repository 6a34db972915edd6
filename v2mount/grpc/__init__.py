"""The Open Inference Protocol over gRPC (extra ``v2mount[grpc]``).

``V2App(grpc_port=8081)`` (or ``V2MOUNT_GRPC_PORT``) serves
``inference.GRPCInferenceService`` — the KServe spec's six RPCs plus Triton's
repository and statistics RPCs — on its own port, over the same models as REST, for as
long as the app runs. See docs/grpc.md.
"""

from __future__ import annotations

from v2mount.grpc._server import GrpcServer

__all__ = ["GrpcServer"]
