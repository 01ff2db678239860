#!/usr/bin/env bash
# Regenerates the committed Swift code for proto/hsmgw/v1/*.proto. The build never runs this:
# the output is committed. Run it after changing a .proto file and commit both.
#
# Versions used for the committed output:
#   protoc            3.21.12 (Debian 12 package protobuf-compiler)
#   protoc-gen-swift  1.39.0  (the protoc-gen-swift product of apple/swift-protobuf 1.39.0,
#                              which must match the SwiftProtobuf version in Package.swift)
#
# PROTOC_GEN_SWIFT names the plugin binary; without it the script builds one from
# https://github.com/apple/swift-protobuf at 1.39.0 in a scratch directory (about 2–10 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."

plugin="${PROTOC_GEN_SWIFT:-}"
if [[ -z "$plugin" ]]; then
    scratch="${TMPDIR:-/tmp}/hsmgw-protoc-gen-swift"
    if [[ ! -d "$scratch/swift-protobuf" ]]; then
        mkdir -p "$scratch"
        git clone --quiet https://github.com/apple/swift-protobuf "$scratch/swift-protobuf"
    fi
    git -C "$scratch/swift-protobuf" checkout --quiet 1.39.0
    (cd "$scratch/swift-protobuf" && swift build -c release --product protoc-gen-swift)
    plugin="$scratch/swift-protobuf/.build/release/protoc-gen-swift"
fi

command -v protoc >/dev/null || { echo "protoc not found: apt-get install protobuf-compiler" >&2; exit 1; }
protoc --plugin=protoc-gen-swift="$plugin" \
    --proto_path=proto \
    --swift_opt=Visibility=Public \
    --swift_opt=FileNaming=PathToUnderscores \
    --swift_out=Sources/GatewayWire/Generated \
    proto/hsmgw/v1/*.proto
echo "generated: $(ls Sources/GatewayWire/Generated)"
