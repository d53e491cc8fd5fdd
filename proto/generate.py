"""Regenerate the protobuf / gRPC modules from quickdraft.proto.

    python -m quickdraft.proto.generate          # rewrite the checked-in modules
    python -m quickdraft.proto.generate --check  # exit 1 if they are stale

The .proto is mapped to the virtual path ``quickdraft/proto/`` so that the
generated gRPC module imports ``quickdraft.proto.quickdraft_pb2`` (the installed
name) instead of a bare top-level module.
"""

from __future__ import annotations

import argparse
import filecmp
import pathlib
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
PROTO = "quickdraft.proto"
OUTPUTS = ("quickdraft_pb2.py", "quickdraft_pb2.pyi", "quickdraft_pb2_grpc.py")


def generate(out_dir: pathlib.Path) -> None:
    from grpc_tools import protoc  # build-time only dependency

    args = [
        "protoc",
        f"-Iquickdraft/proto={HERE}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"quickdraft/proto/{PROTO}",
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate(pathlib.Path(tmp))
        produced = pathlib.Path(tmp) / "quickdraft" / "proto"
        stale = [
            name
            for name in OUTPUTS
            if not (HERE / name).exists() or not filecmp.cmp(produced / name, HERE / name, shallow=False)
        ]
        if opts.check:
            if stale:
                print("stale generated modules: " + ", ".join(stale), file=sys.stderr)
                return 1
            return 0
        for name in OUTPUTS:
            (HERE / name).write_bytes((produced / name).read_bytes())
    return 0


if __name__ == "__main__":
    sys.exit(main())
