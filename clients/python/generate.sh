#!/usr/bin/env bash
# Regenerates the committed protobuf messages of the Python SDK from proto/hsmgw/v1/*.proto:
# src/hsmgw/v1/gateway_pb2.py (--python_out) and its type stubs gateway_pb2.pyi (--pyi_out).
# The package never runs protoc at install or run time: the output is committed. Run this after
# changing a .proto file and commit both, together with the Swift code of
# scripts/generate-protos.sh.
#
# Versions used for the committed output: protoc 3.21.12 (Debian 12's protobuf-compiler). The
# generated code needs a protobuf runtime of 4.21 or later (the builder API); pyproject.toml
# pins the range that was tested with it.
set -euo pipefail
cd "$(dirname "$0")"
root="$(cd ../.. && pwd)"

command -v protoc >/dev/null || { echo "protoc not found: apt-get install protobuf-compiler" >&2; exit 1; }
out="src"
protoc --proto_path="$root/proto" --python_out="$out" --pyi_out="$out" "$root"/proto/hsmgw/v1/*.proto
# protoc makes no __init__.py; the package needs them (empty, and committed).
touch "$out/hsmgw/v1/__init__.py"
echo "generated with $(protoc --version): $(cd "$out" && ls hsmgw/v1/*_pb2.py*)"
