"""Honest-worker checks (`--verify RATE`): what counts as two providers agreeing.

A verified session runs each hop on two providers of its layers (the primary and a shadow)
and compares their outputs before using them; on a mismatch a third provider, replayed to the
same state, decides, and the one that disagrees is banned (`MeshPipeline` does the routing;
this module holds the rule and the record of bans).

The tolerance. The same layers on two honest workers need not give the same bits: meshpy's
kernels give bit-equal outputs for any thread count and any batch shape (measured: SmolLM2,
layers 0-14 and 15-29, 1 vs 2 threads, rows one at a time vs 25 at once), but another instruction set sums in
another order. Forcing the AVX2 path against AVX-512 VNNI moved SmolLM2's outputs by at most
7.6e-4 of a row's norm over 15 layers (the errors of both halves compounded); a bf16 wire rounds each
value to 2^-9 of itself, which two answers may round apart. So two outputs agree when every
row differs by at most `VERIFY_TOLERANCE` = 1e-2 of its norm: more than ten times the
largest honest difference measured, and far below what changes a token (a liar must stay
under 1% of every row it touches; docs/threat-model.md says what that leaves it).
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

__all__ = ["VERIFY_TOLERANCE", "Bans", "disagreement"]

log = logging.getLogger(__name__)

#: Largest difference between two providers' outputs, relative to each row's norm, that
#: still counts as agreement (see the module documentation for the measurements behind it).
VERIFY_TOLERANCE = 1e-2


def disagreement(a: np.ndarray, b: np.ndarray) -> float:
    """How far apart two outputs of the same rows are: the largest row difference relative
    to that row's norm in `b` (infinite when shapes differ or a value is not finite)."""
    if a.shape != b.shape:
        return float("inf")
    a2, b2 = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    if not (np.isfinite(a2).all() and np.isfinite(b2).all()):
        return float("inf")
    diff = np.linalg.norm(a2 - b2, axis=1)
    scale = np.maximum(np.linalg.norm(b2, axis=1), 1e-12)
    return float((diff / scale).max()) if len(diff) else 0.0


class Bans:
    """Providers caught lying, with why; shared by every session of a pipeline (threads)."""

    def __init__(self) -> None:
        self._reasons: dict[str, str] = {}
        self._lock = threading.Lock()

    def add(self, peer: str, reason: str) -> None:
        with self._lock:
            self._reasons.setdefault(peer, f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {reason}")
        log.warning("banned %s: %s", peer, reason)

    def __contains__(self, peer: object) -> bool:
        with self._lock:
            return peer in self._reasons

    def reasons(self) -> dict[str, str]:
        """peer id -> when and why it was banned."""
        with self._lock:
            return dict(self._reasons)
