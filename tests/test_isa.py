"""Kernel levels (scalar, AVX2, AVX-512, AVX-512 VNNI): every level this CPU has can be forced
(`MESHPY_ISA` or `set_simd_level`), a level it lacks or no level is refused with a message
naming the choices. The kernels of each level are tested against the scalar reference in the
Rust suite; tests/test_smollm2_reference.py runs the real model at each level."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from meshpy import _native
from meshpy.errors import InvalidArgumentError

ALL_LEVELS = ("scalar", "avx2", "avx512", "avx512vnni")


def _run_with_isa(value: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MESHPY_ISA": value}
    code = "import meshpy; from meshpy import _native; print(_native.simd_level())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_levels_are_the_cpus_lowest_first() -> None:
    levels = _native.simd_levels()
    assert levels[0] == "scalar"
    assert list(levels) == list(ALL_LEVELS[: len(levels)])
    assert _native.simd_level() in levels


@pytest.mark.parametrize("level", _native.simd_levels())
def test_every_level_the_cpu_has_can_be_set(level: str) -> None:
    previous = _native.simd_level()
    try:
        _native.set_simd_level(level.upper())
        assert _native.simd_level() == level
    finally:
        _native.set_simd_level(previous)


def test_unknown_level_is_refused_with_the_choices() -> None:
    with pytest.raises(InvalidArgumentError, match="avx512vnni"):
        _native.set_simd_level("sse2")


def test_a_level_the_cpu_lacks_is_refused() -> None:
    lacking = ALL_LEVELS[len(_native.simd_levels()) :]
    if not lacking:
        pytest.skip("this CPU has every level (AVX-512 VNNI): nothing to refuse")
    with pytest.raises(InvalidArgumentError, match="this CPU has no"):
        _native.set_simd_level(lacking[-1])


@pytest.mark.parametrize("level", _native.simd_levels())
def test_meshpy_isa_forces_the_level(level: str) -> None:
    done = _run_with_isa(level)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == level


def test_a_bad_meshpy_isa_fails_the_import() -> None:
    done = _run_with_isa("neon")
    assert done.returncode != 0
    assert "MESHPY_ISA" in done.stderr and "scalar, avx2, avx512, avx512vnni" in done.stderr
