"""meshpy._native wire bindings: frames round-trip from Python, the golden Forward frame
matches the bytes hand-checked in rust/src/wire/tests.rs, tensors round to bf16 / f16 as
numpy's independent arithmetic says, and random, truncated or mutated frames raise
meshpy.errors classes (the interpreter survives every one)."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import numpy as np
import pytest

from meshpy import _native
from meshpy.errors import (
    FrameError,
    FrameTooLargeError,
    InvalidArgumentError,
    MeshpyError,
    ShapeError,
    UnsupportedTypeError,
)

HASH = bytes(range(32))

# The frame of rust/src/wire/tests.rs `GOLDEN_FORWARD`, field by field (see the byte table
# in rust/src/wire/mod.rs). Kept here independently: if either side changes the format, its
# test fails.
GOLDEN_FORWARD = bytes.fromhex(
    "4d534850" "0100" "01" "00" "60000000" "00000000" "1000000000000000"  # fixed header
    + HASH.hex()  # model hash
    + "04" "74696e79"  # name "tiny"
    "02000000" "03000000"  # layers 2, count 3
    "01000000"  # one entry:
    "02010000000000000000000000000000"  # session 0x0102
    "0700000000000000" "05000000" "02000000"  # step 7, start 5, 2 tokens
    "03" "02" "02000000" "04000000"  # bf16, (2, 4)
    "0000000000"  # padding to 120
    "803f00c0003f0000" "404080be807f823f"  # payload
)
GOLDEN_VALUES = np.array([[1.0, -2.0, 0.5, 0.0], [3.0, -0.25, np.inf, 1.0 + 3 / 256]], np.float32)


def bf16_reference(x: np.ndarray) -> np.ndarray:
    """x rounded to bf16 (nearest, ties to even) and back, in numpy integer arithmetic."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint32)
    nan = np.isnan(x)
    bits[nan] = (u[nan] >> 16).astype(np.uint32) | 0x40
    return (bits << 16).astype(np.uint32).view(np.float32)


def hidden_states(rows: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, width)) * 10.0 ** rng.integers(-3, 4, (rows, width))).astype(np.float32)


def test_golden_forward_frame_matches_rust() -> None:
    assert len(GOLDEN_FORWARD) == 136
    frame = _native.encode_forward(HASH, "tiny", 2, 3, [(0x0102, 7, 5, 2)], GOLDEN_VALUES, "bf16")
    assert frame == GOLDEN_FORWARD
    d = _native.decode_frame(GOLDEN_FORWARD)
    assert d["kind"] == "forward"
    assert (d["model_hash"], d["model_name"], d["first_layer"], d["layer_count"]) == (HASH, "tiny", 2, 3)
    assert d["entries"] == [(0x0102, 7, 5, 2)]
    assert d["dtype"] == "bf16"
    np.testing.assert_array_equal(d["hidden"], bf16_reference(GOLDEN_VALUES))
    assert d["hidden"][1, 3] == 1.015625  # the tie rounded to even, upwards
    header = _native.read_frame_header(GOLDEN_FORWARD[:24])
    assert header == {"kind": "forward", "header_len": 96, "payload_len": 16, "frame_len": 136}


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_forward_round_trip_per_dtype(dtype: str) -> None:
    x = hidden_states(7, 96)
    x[0, :4] = [np.inf, -np.inf, np.nan, -0.0]
    entries = [(2**128 - 1, 0, 0, 4), (12345, 9, 100, 1), (1 << 64, 2**64 - 1, 2**31, 2)]
    frame = _native.encode_forward(HASH, "SmolLM2-135M", 0, 10, entries, x, dtype)
    d = _native.decode_frame(frame)
    assert d["entries"] == entries and d["dtype"] == dtype
    expected = {"f32": x, "f16": x.astype(np.float16).astype(np.float32), "bf16": bf16_reference(x)}[dtype]
    assert d["hidden"].dtype == np.float32 and d["hidden"].shape == (7, 96)
    np.testing.assert_array_equal(d["hidden"], expected)  # NaN positions must match too
    assert np.signbit(d["hidden"][0, 3])
    # 24 + 163 bytes of fields + 5 of padding, then the payload.
    assert len(frame) == 192 + {"f32": 4, "f16": 2, "bf16": 2}[dtype] * 7 * 96


def test_other_kinds_round_trip() -> None:
    x = hidden_states(3, 8)
    d = _native.decode_frame(_native.encode_forward_result([(5, 1, 10, 3)], x))
    assert (d["kind"], d["entries"], d["dtype"]) == ("forward_result", [(5, 1, 10, 3)], "bf16")
    np.testing.assert_array_equal(d["hidden"], bf16_reference(x))
    for code in _native.error_codes():
        for session in (None, 0, 2**127 + 3):
            d = _native.decode_frame(_native.encode_error(code, f"{code}: ünïcode ✓", session))
            assert d == {"kind": "error", "code": code, "session": session, "message": f"{code}: ünïcode ✓"}
    assert _native.error_codes()[:4] == ["unknown_session", "wrong_model", "wrong_span", "cannot_hold_session"]
    for ack, kind in ((False, "close_session"), (True, "close_session_ack")):
        for ids in ([], [1], [2**128 - 1, 7, 7]):
            assert _native.decode_frame(_native.encode_close_session(ids, ack)) == {"kind": kind, "sessions": ids}
    assert _native.decode_frame(_native.encode_ping(2**64 - 1)) == {"kind": "ping", "nonce": 2**64 - 1}
    assert _native.decode_frame(_native.encode_ping(0, pong=True)) == {"kind": "pong", "nonce": 0}


def test_info_frames_match_rust_golden_bytes_and_carry_dicts() -> None:
    # rust/src/wire/tests.rs GOLDEN_INFO and GOLDEN_INFO_REPLY, field by field.
    info = bytes.fromhex("4d534850" "0100" "08" "00" "00000000" "00000000" "0000000000000000")
    reply = bytes.fromhex(
        "4d534850" "0100" "09" "00" "18000000" "00000000" "0000000000000000"
        "0f000000" + b'{"mode":"echo"}'.hex() + "0000000000"
    )
    assert _native.encode_info() == info
    assert _native.decode_frame(info) == {"kind": "info"}
    assert _native.encode_info_reply({"mode": "echo"}) == reply
    assert _native.decode_frame(reply) == {"kind": "info_reply", "info": {"mode": "echo"}}
    rich = {"mode": "span", "first_layer": 10, "name": "été ✓", "x": [1.5, None, True], "nested": {"a": {}}}
    assert _native.decode_frame(_native.encode_info_reply(rich))["info"] == rich
    assert _native.read_frame_header(reply)["kind"] == "info_reply"


def test_info_replies_must_be_json_objects() -> None:
    for bad in ([1, 2], "mode", {"x": float("nan")}, {"x": object()}):
        with pytest.raises(InvalidArgumentError, match="info"):
            _native.encode_info_reply(bad)  # type: ignore[arg-type]
    for text in (b"[1,2]", b'"mode"', b"{", b"{} {}", b"\xff"):
        padded = -(-(4 + len(text)) // 8) * 8
        frame = (
            b"MSHP" + (1).to_bytes(2, "little") + b"\x09\x00" + padded.to_bytes(4, "little") + bytes(4) + bytes(8)
            + len(text).to_bytes(4, "little") + text + bytes(padded - 4 - len(text))
        )
        with pytest.raises(FrameError, match="info"):
            _native.decode_frame(frame)


def test_decode_takes_bytes_like_and_strided_arrays() -> None:
    x = hidden_states(8, 6)
    strided = x.T  # (6, 8), not C-contiguous
    frame = _native.encode_forward_result([(1, 0, 0, 6)], strided, "f32")
    for form in (frame, bytearray(frame), memoryview(frame)):
        np.testing.assert_array_equal(_native.decode_frame(form)["hidden"], strided)
    with pytest.raises(TypeError):
        _native.decode_frame("not bytes")  # type: ignore[arg-type]


def test_every_truncation_raises_frame_error() -> None:
    frames = [
        GOLDEN_FORWARD,
        _native.encode_forward_result([(1, 0, 0, 2), (2, 0, 0, 1)], hidden_states(3, 5), "f16"),
        _native.encode_error("wrong_model", "no", 3),
        _native.encode_close_session([1, 2]),
        _native.encode_ping(9),
    ]
    for frame in frames:
        for n in range(len(frame)):
            with pytest.raises(FrameError):
                _native.decode_frame(frame[:n])
        with pytest.raises(FrameError, match="the buffer holds"):
            _native.decode_frame(frame + b"\0")


def test_random_and_mutated_frames_raise_meshpy_errors() -> None:
    rng = np.random.default_rng(1)
    outcomes = {"ok": 0, "error": 0}

    def attempt(data: bytes) -> None:
        try:
            _native.decode_frame(data)
            outcomes["ok"] += 1
        except FrameError as e:  # FrameTooLargeError included
            assert isinstance(e, MeshpyError) and isinstance(e, ValueError)
            outcomes["error"] += 1

    for _ in range(2000):
        attempt(rng.bytes(int(rng.integers(0, 200))))
        attempt(GOLDEN_FORWARD[:24] + rng.bytes(int(rng.integers(0, 200))))
    for _ in range(3000):
        frame = bytearray(GOLDEN_FORWARD)
        for _ in range(int(rng.integers(1, 4))):
            at = int(rng.integers(0, len(frame)))
            op = rng.integers(0, 4)
            if op == 0:
                frame[at] ^= 1 << int(rng.integers(0, 8))
            elif op == 1:
                frame[at : at + 4] = rng.bytes(4)
            elif op == 2:
                del frame[at : at + int(rng.integers(1, 16))]
            else:
                frame[at:at] = rng.bytes(int(rng.integers(1, 16)))
        attempt(bytes(frame))
    # Mutations inside the payload still decode; the rest must have been refused.
    assert outcomes["ok"] > 0 and outcomes["error"] > 4000


def test_lying_fields_name_the_problem() -> None:
    def edited(at: int, value: bytes) -> bytes:
        return GOLDEN_FORWARD[:at] + value + GOLDEN_FORWARD[at + len(value) :]

    cases = {
        "bad magic": edited(0, b"MSHQ"),
        "unsupported version 2": edited(4, b"\x02"),
        "unknown message kind 17": edited(6, b"\x11"),
        "unknown tensor dtype 7": edited(105, b"\x07"),
        "tensor rank 5": edited(106, b"\x05"),
        "2 rows, the entries 3 tokens": edited(101, (3).to_bytes(4, "little")),
        "payload is 16 bytes": edited(111, (5).to_bytes(4, "little")),
        "needs 64 bytes": edited(69, (2).to_bytes(4, "little")),
    }
    for message, frame in cases.items():
        with pytest.raises(FrameError, match=message):
            _native.decode_frame(frame)


def test_oversized_frames_are_refused_from_the_fixed_header() -> None:
    with pytest.raises(FrameTooLargeError, match="frame is 136, the limit is 100"):
        _native.read_frame_header(GOLDEN_FORWARD[:24], max_frame_bytes=100)
    with pytest.raises(FrameTooLargeError):
        _native.decode_frame(GOLDEN_FORWARD, max_frame_bytes=135)
    huge = GOLDEN_FORWARD[:16] + (1 << 40).to_bytes(8, "little")
    with pytest.raises(FrameTooLargeError):
        _native.read_frame_header(huge)
    assert _native.read_frame_header(huge, max_frame_bytes=1 << 41)["payload_len"] == 1 << 40
    with pytest.raises(FrameError, match="truncated fixed header"):
        _native.read_frame_header(GOLDEN_FORWARD[:23])


def test_encoders_reject_bad_arguments() -> None:
    x = hidden_states(2, 4)
    with pytest.raises(InvalidArgumentError, match="32 bytes"):
        _native.encode_forward(b"short", "m", 0, 1, [(1, 0, 0, 2)], x)
    with pytest.raises(InvalidArgumentError, match="2 rows, the entries 3 tokens"):
        _native.encode_forward(HASH, "m", 0, 1, [(1, 0, 0, 3)], x)
    with pytest.raises(InvalidArgumentError, match="twice"):
        _native.encode_forward_result([(1, 0, 0, 1), (1, 0, 0, 1)], x)
    with pytest.raises(InvalidArgumentError, match="no layers"):
        _native.encode_forward(HASH, "m", 0, 0, [(1, 0, 0, 2)], x)
    with pytest.raises(InvalidArgumentError, match="at most 255"):
        _native.encode_forward(HASH, "m" * 256, 0, 1, [(1, 0, 0, 2)], x)
    with pytest.raises(UnsupportedTypeError):
        _native.encode_forward_result([(1, 0, 0, 2)], x, "int8")
    with pytest.raises(InvalidArgumentError, match="unknown error code"):
        _native.encode_error("oops", "m")
    with pytest.raises(OverflowError):
        _native.encode_close_session([2**128])
    assert issubclass(ShapeError, MeshpyError)


def test_bf16_helpers_match_numpy_reference() -> None:
    x = np.concatenate(
        [
            hidden_states(1, 1000).ravel(),
            np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4e38, 1e-45, 1.0 + 2**-8, 1.0 + 3 * 2**-8], np.float32),
        ]
    )
    bits = _native.f32_to_bf16(x.reshape(-1, 1))
    assert bits.dtype == np.uint16 and bits.shape == (x.size, 1)
    back = _native.bf16_to_f32(bits).ravel()
    np.testing.assert_array_equal(back, bf16_reference(x))
    assert back[-2] == 1.0 and back[-1] == 1.015625  # ties to even, both ways
    assert back[-4] == np.inf  # 3.4e38 rounds past the largest bf16


def test_stubs_match_the_extension() -> None:
    """The `# wire` section of _native.pyi names the functions and parameters the module has."""
    stub = Path(_native.__file__).with_name("_native.pyi").read_text()
    parts = re.split(r"^# (\w+) \(rust/src/py/\w+\.rs\)$", stub, flags=re.MULTILINE)
    section = dict(zip(parts[1::2], parts[2::2]))["wire"]
    functions = [node for node in ast.parse(section).body if isinstance(node, ast.FunctionDef)]
    assert {f.name for f in functions} == {
        "encode_forward",
        "encode_forward_result",
        "encode_error",
        "encode_close_session",
        "encode_fork_session",
        "encode_ping",
        "encode_info",
        "encode_info_reply",
        "decode_frame",
        "read_frame_header",
        "error_codes",
        "f32_to_bf16",
        "bf16_to_f32",
    }
    for f in functions:
        runtime = list(inspect.signature(getattr(_native, f.name)).parameters)
        assert runtime == [a.arg for a in f.args.args], f.name
