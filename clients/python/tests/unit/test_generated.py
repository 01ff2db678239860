"""The committed messages are what protoc makes of proto/ today (clients/python/generate.sh), so a
change to the .proto cannot leave the SDK on an old schema."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

from .support import REPO_ROOT

PACKAGE_ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_committed_messages_match_protoc_output(tmp_path: pathlib.Path) -> None:
    protoc = shutil.which("protoc")
    assert protoc is not None, "protoc is needed (apt-get install protobuf-compiler; `make deps` does it)"
    protos = sorted(str(p) for p in (REPO_ROOT / "proto" / "hsmgw" / "v1").glob("*.proto"))
    subprocess.run(
        [protoc, "--proto_path=%s" % (REPO_ROOT / "proto"), "--python_out=%s" % tmp_path, "--pyi_out=%s" % tmp_path]
        + protos,
        check=True,
        timeout=120,
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2.py*"))
    assert generated, "protoc wrote nothing"
    for relative in generated:
        committed = PACKAGE_ROOT / "src" / relative
        assert committed.read_bytes() == (tmp_path / relative).read_bytes(), (
            "%s is stale: run clients/python/generate.sh and commit the result" % committed
        )
