"""Regenerate the protobuf and gRPC modules in ``v2mount/grpc/proto`` from the .proto files.

    python -m v2mount.grpc.generate        # needs grpcio-tools (the ``dev`` extra)

It runs grpcio-tools' ``protoc`` on every ``.proto`` in that folder, then makes one
change to each ``*_pb2.py``: the file goes into a descriptor pool of its own instead of
protobuf's default pool. ``tritonclient.grpc`` (and MLServer) register the same
``inference.*`` message names in the default pool, and protobuf refuses a second
definition of a name there, so without this a process could not import both. The
output is committed; never edit it by hand, run this instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["main"]

PROTO_DIR = Path(__file__).parent / "proto"
#: protoc runs from the folder holding the package, so imports read ``v2mount.grpc.proto``.
ROOT = PROTO_DIR.parents[2]
DEFAULT_POOL = "_descriptor_pool.Default()"
PRIVATE_POOL = "_descriptor_pool.DescriptorPool()"


def main() -> int:
    from grpc_tools import protoc  # type: ignore[import-untyped]

    protos = sorted(PROTO_DIR.glob("*.proto"))
    for proto in protos:
        relative = proto.relative_to(ROOT).as_posix()
        status = protoc.main(
            [
                "protoc",
                f"-I{ROOT}",
                f"--python_out={ROOT}",
                f"--pyi_out={ROOT}",
                f"--grpc_python_out={ROOT}",
                relative,
            ]
        )
        if status != 0:
            print(f"protoc failed on {relative}", file=sys.stderr)
            return 1
        module = proto.with_name(proto.stem + "_pb2.py")
        source = module.read_text(encoding="utf-8")
        if source.count(DEFAULT_POOL) != 1:
            print(f"{module.name}: expected one {DEFAULT_POOL}", file=sys.stderr)
            return 1
        module.write_text(source.replace(DEFAULT_POOL, PRIVATE_POOL), encoding="utf-8")
        print(f"generated {module.relative_to(ROOT)} and its gRPC stubs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
