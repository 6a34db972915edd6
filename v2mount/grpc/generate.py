"""Regenerate the protobuf and gRPC modules in ``v2mount/grpc/proto`` from the .proto files.

    python -m v2mount.grpc.generate          # rewrite them (needs grpcio-tools: ``dev``)
    python -m v2mount.grpc.generate --check  # exit 1 if the committed ones differ

It runs grpcio-tools' ``protoc`` on every ``.proto`` in that folder, then makes one
change to each ``*_pb2.py``: the file goes into a descriptor pool of its own instead of
protobuf's default pool. ``tritonclient.grpc`` (and MLServer) register the same
``inference.*`` message names in the default pool, and protobuf refuses a second
definition of a name there, so without this one process could not import both. The
output is committed; never edit it by hand, run this instead.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["generate", "main"]

PROTO_DIR = Path(__file__).parent / "proto"
#: The folder holding the ``v2mount`` package: protoc runs from there, so that the
#: generated imports read ``from v2mount.grpc.proto import ...``.
ROOT = PROTO_DIR.parents[2]
DEFAULT_POOL = "_descriptor_pool.Default()"
PRIVATE_POOL = "_descriptor_pool.DescriptorPool()"


def generate(root: Path) -> list[Path]:
    """Generate the modules of every .proto under ``root``'s ``v2mount/grpc/proto``."""
    from grpc_tools import protoc  # type: ignore[import-untyped]

    folder = root / PROTO_DIR.relative_to(ROOT)
    written: list[Path] = []
    for proto in sorted(folder.glob("*.proto")):
        relative = proto.relative_to(root).as_posix()
        outputs = [f"--{kind}_out={root}" for kind in ("python", "pyi", "grpc_python")]
        if protoc.main(["protoc", f"-I{root}", *outputs, relative]) != 0:
            raise RuntimeError(f"protoc failed on {relative}")
        module = proto.with_name(proto.stem + "_pb2.py")
        source = module.read_text(encoding="utf-8")
        if source.count(DEFAULT_POOL) != 1:
            raise RuntimeError(f"{module.name}: expected exactly one {DEFAULT_POOL}")
        module.write_text(source.replace(DEFAULT_POOL, PRIVATE_POOL), encoding="utf-8")
        stem = proto.stem
        written += [proto.with_name(f"{stem}{suffix}") for suffix in _SUFFIXES]
    return written


_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args not in ([], ["--check"]):
        print("usage: python -m v2mount.grpc.generate [--check]", file=sys.stderr)
        return 2
    if not args:
        for path in generate(ROOT):
            print(f"generated {path.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / PROTO_DIR.relative_to(ROOT)
        copy.mkdir(parents=True)
        for proto in PROTO_DIR.glob("*.proto"):
            shutil.copy(proto, copy / proto.name)
        stale = [
            path.name
            for path in generate(Path(scratch))
            if not (PROTO_DIR / path.name).is_file()
            or (PROTO_DIR / path.name).read_bytes() != path.read_bytes()
        ]
    if stale:
        print(f"out of date: {', '.join(stale)}; run python -m v2mount.grpc.generate")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
