#!/usr/bin/env bash
# Builds the extension in place for development, without pip: python/meshpy/_native.abi3.so.
# Then `PYTHONPATH=python python -m pytest` uses this tree. Usage: scripts/develop.sh [release|dev]
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-release}
cargo build --profile "$profile" --features extension-module --lib
dir=$([ "$profile" = dev ] && echo debug || echo "$profile")
# Copy, then rename over the old file: processes that have the old one loaded keep their
# (unlinked) copy instead of crashing on a file rewritten under them.
cp "${CARGO_TARGET_DIR:-target}/$dir/libmeshpy_native.so" python/meshpy/.native.abi3.so.tmp
mv -f python/meshpy/.native.abi3.so.tmp python/meshpy/_native.abi3.so
