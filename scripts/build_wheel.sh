#!/usr/bin/env bash
# Builds the wheel to ship: CPython 3.10+ stable ABI (abi3), manylinux2014 (glibc 2.17) x86_64.
# zig links it against glibc 2.17's symbols, whatever this machine's glibc, and auditwheel
# checks that the wheel holds to the tag it claims. Installs maturin, ziglang and auditwheel
# into the current Python environment when they are missing. Builds in target/wheel (or
# $CARGO_TARGET_DIR), apart from a developer's target/. Prints the wheel's absolute path on stdout.
# Usage: scripts/build_wheel.sh [OUT_DIR]   (default: dist)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-dist}
policy=manylinux_2_17_x86_64   # = manylinux2014_x86_64

missing=()
python -c 'import maturin' 2>/dev/null || missing+=("maturin>=1.9,<2")
python -c 'import ziglang' 2>/dev/null || missing+=(ziglang)
python -c 'import auditwheel' 2>/dev/null || missing+=(auditwheel)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing ${missing[*]}" >&2
    python -m pip install --quiet "${missing[@]}" >&2
fi

# A fresh folder per build, so the wheel found below is this build's and no other.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/wheel}
staging="$CARGO_TARGET_DIR/wheels"
rm -rf "$staging"
# --strip drops the release profile's line tables (debug = 1), a large part of the library.
python -m maturin build --release --strip --zig --target x86_64-unknown-linux-gnu \
    --compatibility manylinux2014 --out "$staging" >&2
wheels=("$staging"/*.whl)
if [ "${#wheels[@]}" -ne 1 ] || [ ! -f "${wheels[0]}" ]; then
    echo "expected one wheel in $staging, found: ${wheels[*]}" >&2
    exit 1
fi
wheel=${wheels[0]}
case "$(basename "$wheel")" in
    *-cp310-abi3-*"$policy"*) ;;
    *) echo "$(basename "$wheel") is not a cp310-abi3 $policy wheel" >&2; exit 1 ;;
esac

# auditwheel names the most compatible tag the wheel's libraries allow (glibc symbol
# versions, libraries outside the manylinux set); it must be the one the file name claims.
report=$(python -m auditwheel show "$wheel" | tr -s ' \n' '  ')
echo "$report" >&2
if ! grep -q "consistent with the following platform tag: \"$policy\"" <<<"$report"; then
    echo "auditwheel: $(basename "$wheel") does not meet $policy" >&2
    exit 1
fi

mkdir -p "$out"
mv -f "$wheel" "$out/"
echo "$(cd "$out" && pwd)/$(basename "$wheel")"
