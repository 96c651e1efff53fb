"""Type stubs of meshpy._native, the Rust extension (private: import from meshpy). One
section per binding file, headed "# <name> (rust/src/py/<name>.rs)"; tests check them."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

__version__: Final[str]

# checkpoint (rust/src/py/checkpoint.rs)

class Checkpoint:
    """A memory-mapped checkpoint: one GGUF file, or one or more safetensors shards.

    The format is chosen by the files' first bytes. Raises CheckpointIOError,
    CheckpointFormatError (truncated or corrupt, with the byte offset), MissingTensorError
    and UnsupportedTypeError from meshpy.errors.
    """

    def __init__(self, paths: Sequence[str | os.PathLike[str]]) -> None: ...
    @property
    def format(self) -> Literal["gguf", "safetensors"]: ...
    @property
    def paths(self) -> list[pathlib.Path]: ...
    def metadata(self) -> dict[str, Any]:
        """GGUF key-values (arrays as lists), or the safetensors ``__metadata__`` strings."""
    def tensor_names(self) -> list[str]:
        """Every tensor name, sorted."""
    def tensor_info(self, name: str) -> tuple[str, tuple[int, ...]]:
        """``(type name, shape)``, e.g. ``("Q4_K", (576, 1536))``; shape outermost first;
        ``"U8"`` for a safetensors U8 tensor (raw bytes: MXFP4 blocks and exponents)."""
    def tensor_sha256(self, name: str) -> str:
        """SHA-256 (hex) of the tensor's stored bytes, read in place without the GIL; its
        pages are dropped from this process afterwards (they stay in the page cache)."""
    def tensor_bytes(self, name: str) -> bytes:
        """A copy of the tensor's raw little-endian bytes."""
    def touch(self, names: Sequence[str]) -> int:
        """Test hook: reads the named tensors in place; returns the wrapping sum of their bytes."""
    @property
    def metadata_end(self) -> int | None:
        """A GGUF file's byte count up to the end of its key-values; None for safetensors."""
    def byte_range(self, name: str) -> tuple[pathlib.Path, int, int]:
        """``(path, start, end)``: the file holding the tensor and its bytes' range there."""
    def __len__(self) -> int: ...
    def __contains__(self, name: str) -> bool: ...

def gguf_store_header(prefix: bytes, tensors: Sequence[tuple[str, str, Sequence[int]]]) -> tuple[bytes, list[tuple[int, int]]]:
    """The header of a GGUF file holding ``tensors`` (name, type name, shape outermost first) in
    that order around ``prefix`` (another GGUF's bytes up to the end of its key-values), and
    each tensor's ``(offset, length)`` in that file."""

# quant (rust/src/py/quant.rs)
# Type names are ggml's, any case: "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
# "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ4_NL", "IQ4_XS" (the
# k-quants also without the underscore, "q4k"). quantize() makes every one of them but
# Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL and IQ4_XS. `data`/`w` take bytes, bytearray, or
# anything with tobytes() (numpy arrays, memoryview), read as raw bytes.

def dequantize(type_name: str, data: bytes | bytearray | memoryview | npt.NDArray[np.generic], n: int) -> npt.NDArray[np.float32]:
    """The n elements encoded in data (exactly n elements of that type), bit-exact with ggml."""

def quantize(type_name: str, x: npt.NDArray[np.float32]) -> bytes:
    """x (1-D float32) encoded as that type, bit-exact with ggml's reference quantizers."""

def vec_dot(type_name: str, w: bytes | bytearray | memoryview | npt.NDArray[np.generic], x: npt.NDArray[np.float32]) -> float:
    """Dot of weight row w with x (1-D float32), x quantized to the type's activation format."""

def tensor_nbytes(type_name: str, shape: Sequence[int]) -> int:
    """Bytes of a tensor of that type and shape (outermost first) as a checkpoint stores it."""

def simd_level() -> str:
    """The kernels' instruction set: "scalar", "avx2", "avx512" or "avx512vnni" (the CPU's
    best, or what MESHPY_ISA / set_simd_level chose)."""

def simd_levels() -> list[str]:
    """Every level this CPU runs, lowest first."""

def set_simd_level(name: str) -> None:
    """Kernels run at this level from now on (models loaded earlier keep their matrix
    kernels); InvalidArgumentError for a level this CPU lacks or an unknown name."""

# model (rust/src/py/model.rs)

class ThreadPool:
    """Compute threads shared by the spans and heads of one process. Idle threads spin
    `idle_spin` seconds (default 0.002) for the next job before sleeping."""

    def __init__(self, n_threads: int, idle_spin: float | None = None) -> None: ...
    @property
    def n_threads(self) -> int: ...
    def read_bandwidth(self, n_bytes: int, repeats: int = 3) -> float:
        """Bytes/s at which these threads read a fresh n_bytes buffer (best of repeats)."""

class KvCache:
    """One session's KV cache for one span."""

    @property
    def len(self) -> int: ...
    def __len__(self) -> int: ...
    @property
    def max_len(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def held_bytes(self) -> int:
        """Bytes of the positions held (sliding-window layers keep a bounded window)."""
    @property
    def bytes_per_position(self) -> int:
        """Bytes one more position costs at most, across all layers."""
    def truncate(self, len: int) -> None:
        """Forgets positions from `len` on; `InvalidArgumentError` when a sliding-window
        layer no longer holds the positions a step at `len` needs."""
    def fork(self, len: int) -> KvCache:
        """A new cache holding a copy of this one's first `len` positions; an error as for
        `truncate`."""

class DecoderSpan:
    """Layers first_layer .. first_layer + n_layers of a decoder model on the CPU (every
    supported family: one layer whose options the roles and config choose).

    `layer_names` maps roles to tensor names per layer: `attn_norm`, `attn_q`, `attn_k`,
    `attn_v`, `attn_output`, `ffn_norm`, `ffn_gate`, `ffn_up`, `ffn_down`, and optionally
    `attn_q_bias`, `attn_k_bias`, `attn_v_bias` (Qwen2), `attn_q_norm`, `attn_k_norm`
    (Qwen3, Gemma 3) and `attn_post_norm`, `ffn_post_norm` (Gemma 3). A role not used is an
    error. A name may end in a row range, `name[start:end]`: the role is those rows of a fused
    tensor (Phi-3's `qkv_proj`, `gate_up_proj`), any stored type. `config` is
    `ModelConfig.span_config()`; its Gemma 3 keys (`norm_offset`, `gelu_tanh`,
    `layer_sliding`, `sliding_window`, `rope_local_inv_freq`: empty for sliding layers that
    rotate as the others) and LongRoPE keys (`rope_long_inv_freq`, `rope_long_from`) may be
    left out. gpt-oss adds `attn_output_bias` and `attn_sinks` (one logit per query head).
    A layer naming a router `ffn_gate_inp` (optional `ffn_gate_inp_bias`) has a mixture of
    experts instead of the dense MLP: roles `ffn_gate_exps`, `ffn_up_exps`, `ffn_down_exps`
    name stacked `[n_experts, rows, cols]` tensors, or `ffn_gate_exps.{j}` ... one per expert,
    or `ffn_gate_up_exps_t` / `ffn_down_exps_t` transformers' gpt-oss layout (`[n_experts,
    cols, rows]` used as `x @ W`, gate and up in alternating columns), or
    `ffn_gate_up_exps_blocks` / `_scales` and `ffn_down_exps_blocks` / `_scales` its released
    MXFP4 layout (U8 tensors, gate and up in alternating rows); optional biases
    `ffn_gate_exps_bias`, `ffn_up_exps_bias`, `ffn_down_exps_bias` (`[n_experts, len]`) or
    `ffn_gate_up_exps_bias` (interleaved). `config` then holds `n_experts`, `n_experts_used`,
    `norm_topk_prob`, and optionally `expert_gating` ("softmax" or "topk_softmax") and
    `swiglu_clamp` ((alpha, limit): gpt-oss's clamped SwiGLU). Gemma 4 adds `global_head_dim`
    and `global_n_kv_heads` (global layers' shape), `v_norm`, `kv_source` (per layer, the
    layer whose keys and values it shares, or None), `per_layer_input` and `n_layers`; roles
    `layer_output_scale`, `ple_gate`, `ple_proj`, `ple_post_norm`; a layer without `attn_v`
    takes values from the keys' projection, one with a `kv_source` names no k/v roles. Rows
    in and out are `row_width_in` / `row_width_out` wide (`row_width`)."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        config: dict[str, Any],
        first_layer: int,
        layer_names: Sequence[dict[str, str]],
        pool: ThreadPool,
        progress: Callable[[int], object] | None = None,
    ) -> None: ...
    @property
    def first_layer(self) -> int: ...
    @property
    def n_layers(self) -> int: ...
    @property
    def hidden(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def kv_dtype(self) -> str:
        """How session caches store keys and values: "f32" or "f16"."""
    @property
    def row_width_in(self) -> int:
        """Values per row entering the span (the hidden size for most models)."""
    @property
    def row_width_out(self) -> int:
        """Values per row leaving the span."""
    def new_cache(self, max_len: int) -> KvCache: ...
    def forward(self, hidden: npt.NDArray[np.float32], cache: KvCache) -> npt.NDArray[np.float32]: ...
    def forward_batch(
        self, hidden: npt.NDArray[np.float32], entries: Sequence[tuple[KvCache, int]]
    ) -> npt.NDArray[np.float32]: ...
    def fork(self, cache: KvCache, len: int) -> KvCache:
        """A copy of `cache`'s first `len` positions (as `KvCache.fork`)."""
    def export_state(self, cache: KvCache) -> bytes:
        """The cache's state, as a worker hands a session over."""
    def import_state(self, cache: KvCache, state: bytes) -> None:
        """Loads a state (from this or the torch path) into an empty cache of this span."""
    def layer_weights(self, layer: int) -> dict[str, Any]:
        """Span layer `layer` as loaded, for the torch path: `sliding`, `head_dim`,
        `n_kv_heads`, `kv_source`, and each weight by checkpoint role as float32 (dequantized,
        matrices `(out, in)`, experts stacked `(n, out, in)`, norm offsets added)."""

class TorchSpan:
    """Layers computed by a Python object (`meshpy.gpu.span.TorchSpan`: forward, fork,
    read_rows, write_rows) with the sessions' book-keeping in Rust; a node serves it as it
    serves a `DecoderSpan`."""

    def __init__(self, span: Any, config: dict[str, Any], first_layer: int, n_layers: int, kv_dtype: str, device: str) -> None: ...
    @property
    def first_layer(self) -> int: ...
    @property
    def n_layers(self) -> int: ...
    @property
    def kv_dtype(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def row_width_in(self) -> int: ...
    @property
    def row_width_out(self) -> int: ...
    def new_cache(self, max_len: int) -> KvCache: ...
    def forward(self, hidden: npt.NDArray[np.float32], cache: KvCache) -> npt.NDArray[np.float32]: ...
    def forward_batch(
        self, hidden: npt.NDArray[np.float32], entries: Sequence[tuple[KvCache, int]]
    ) -> npt.NDArray[np.float32]: ...
    def fork(self, cache: KvCache, len: int) -> KvCache: ...
    def export_state(self, cache: KvCache) -> bytes: ...
    def import_state(self, cache: KvCache, state: bytes) -> None: ...

def row_width(config: dict[str, Any], boundary: int) -> int:
    """Values per row entering model layer `boundary` (`n_layers`: leaving the last) for span
    settings `config`: the hidden size, plus Gemma 4's per-layer inputs of the layers from
    `boundary` on and the shared keys and values crossing it."""

class PerLayerInputs:
    """Gemma 4's per-layer inputs (E2B/E4B), computed on the End node from token ids."""

    def __init__(
        self, checkpoint: Checkpoint, table_name: str, proj_name: str, norm_name: str, width: int, eps: float, pool: ThreadPool
    ) -> None: ...
    def compute(self, ids: Sequence[int], embedded: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """`(len(ids), n_layers * width)` inputs of tokens whose scaled embeddings are `embedded`."""

class TokenEmbedding:
    """The token embedding table."""

    def __init__(self, checkpoint: Checkpoint, name: str, scale: float = 1.0) -> None: ...
    @property
    def vocab(self) -> int: ...
    @property
    def hidden(self) -> int: ...
    def lookup(self, ids: Sequence[int]) -> npt.NDArray[np.float32]: ...

class OutputHead:
    """Final norm and vocabulary projection."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        norm_name: str,
        weight_name: str,
        eps: float,
        pool: ThreadPool,
        norm_offset: float = 0.0,
    ) -> None: ...
    @property
    def vocab(self) -> int: ...
    def logits(self, hidden: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]: ...

# wire (rust/src/py/wire.rs)
# Frames of the mesh's tensor protocol (rust/src/wire/mod.rs has the byte layout). Entries
# are (session, step, start_pos, n_tokens); session ids are 128-bit ints. dtype names: "f32",
# "f16", "bf16". Decoding raises FrameError / FrameTooLargeError (meshpy.errors); an
# info_reply decodes to {"kind": "info_reply", "info": dict} (not one JSON object: FrameError).

def encode_forward(
    model_hash: bytes,
    model_name: str,
    first_layer: int,
    layer_count: int,
    entries: Sequence[tuple[int, int, int, int]],
    hidden: npt.NDArray[np.float32],
    dtype: str = "bf16",
) -> bytes: ...
def encode_forward_result(
    entries: Sequence[tuple[int, int, int, int]], hidden: npt.NDArray[np.float32], dtype: str = "bf16"
) -> bytes: ...
def encode_error(code: str, message: str, session: int | None = None) -> bytes: ...
def encode_close_session(sessions: Sequence[int], ack: bool = False) -> bytes: ...
def encode_fork_session(source: int, target: int, positions: int) -> bytes: ...
def encode_ping(nonce: int, pong: bool = False) -> bytes: ...
def encode_info() -> bytes: ...
def encode_info_reply(info: dict[str, Any]) -> bytes: ...
def decode_frame(data: bytes | bytearray | memoryview, max_frame_bytes: int | None = None) -> dict[str, Any]: ...
def read_frame_header(prefix: bytes, max_frame_bytes: int | None = None) -> dict[str, Any]: ...
def error_codes() -> list[str]: ...
def f32_to_bf16(x: npt.NDArray[np.float32]) -> npt.NDArray[np.uint16]: ...
def bf16_to_f32(bits: npt.NDArray[np.uint16]) -> npt.NDArray[np.float32]: ...

# logging (rust/src/py/logging.rs)

def init_logging(level: str) -> bool:
    """Rust log events at `level` ("error", "warning", "info", "debug") and above go to stderr;
    False when already set up (the first call wins)."""

# net (rust/src/py/net.rs)
# A libp2p node: identity key in node_dir, TCP+Noise+Yamux and/or QUIC (TCP alone, under a
# private-network layer, with network_key), Kademlia provider
# records, and the tensor protocol "/meshpy/tensor/1" (one wire frame per request/response).
# Calls that wait on the network release the GIL; failures raise NetworkError /
# RequestTimeoutError / IdentityError (meshpy.errors).

def generate_network_key(path: str | os.PathLike[str]) -> str:
    """Writes a new random network key to `path` (owner-only; never over a file); its fingerprint."""
def network_key_fingerprint(path: str | os.PathLike[str]) -> str:
    """The fingerprint of the network key in `path`."""

class Node:
    def __init__(
        self,
        node_dir: str | os.PathLike[str],
        port: int = 0,
        transport: Literal["tcp", "quic", "both"] = "tcp",
        bootstrap: Sequence[str] = ...,
        serve: None | Literal["echo"] | DecoderSpan = None,
        *,
        host: str = "127.0.0.1",
        model_name: str | None = None,
        model_hash: bytes | None = None,
        request_timeout: float = 60.0,
        query_timeout: float = 30.0,
        max_frame_bytes: int | None = None,
        kv_budget_bytes: int = ...,
        idle_timeout: float = 300.0,
        max_positions: int | None = None,
        info: dict[str, Any] | None = None,
        provider_ttl: float = 600.0,
        dht_server: bool = True,
        network_key: str | os.PathLike[str] | None = None,
        allow_peers: Sequence[str] | None = None,
        peer_rate: float = 2000.0,
        sessions_per_peer: int = 1024,
        kv_bytes_per_peer: int | None = None,
        mdns: bool = False,
        relay_server: bool = False,
        hole_punch: bool = True,
    ) -> None: ...
    @property
    def peer_id(self) -> str: ...
    def listen_addrs(self) -> list[str]: ...
    def connected_peers(self) -> list[str]: ...
    def connections(self) -> list[dict[str, Any]]:
        """Every open connection: `peer`, `addr` (a `/p2p-circuit` one when relayed),
        `relayed`, `outbound`."""
    def reachability(self) -> dict[str, Any]:
        """`reachability` ("unknown", "public", "private") and `relayed_through` (relays
        holding a slot for this node)."""
    def dial(self, addr: str) -> str: ...
    def bootstrap(self) -> None: ...
    def start_providing(self, key: bytes | str) -> None: ...
    def stop_providing(self, key: bytes | str) -> None:
        """Stops announcing `key`; other nodes forget this provider within provider_ttl."""
    def get_providers(self, key: bytes | str) -> list[tuple[str, list[str]]]: ...
    def get_providers_many(self, keys: Sequence[bytes | str]) -> list[list[tuple[str, list[str]]]]:
        """get_providers of every key, the lookups run concurrently; one list per key, in order."""
    def request(self, peer: str, frame: bytes, timeout: float | None = None) -> bytes: ...
    def forward(
        self,
        peer: str,
        model_hash: bytes,
        model_name: str,
        first_layer: int,
        layer_count: int,
        entries: Sequence[tuple[int, int, int, int]],
        hidden: npt.NDArray[np.float32],
        wire_dtype: str = "f32",
        timeout: float | None = None,
        width_out: int | None = None,
    ) -> npt.NDArray[np.float32]:
        """One hop of the span protocol: `hidden` (rows of `entries`, in order) through the
        layers on `peer`; the output, as many rows of `width_out` (default: the input's
        width; `ModelConfig.row_widths`). WorkerError (with `code`, `recoverable`)
        when the worker refuses or its answer is not this request's result."""
    def forward_chain(
        self,
        route: Sequence[tuple[str, Sequence[str], int, int, int]],
        model_hash: bytes,
        model_name: str,
        entries: Sequence[tuple[int, int, int, int]],
        hidden: npt.NDArray[np.float32],
        wire_dtype: str = "f32",
        timeout: float | None = None,
    ) -> tuple[list[npt.NDArray[np.float32]], BaseException | None]:
        """A chained route: `hidden` through every hop of `route` (peer, its multiaddrs,
        first layer, layer count, the width of its answer's rows), each worker passing its output to the next. The hops'
        outputs in order up to the first that failed, and that failure (or None)."""
    def info(self, peer: str, timeout: float | None = None) -> dict[str, Any]:
        """The peer's Info reply: "mode" ("span", "echo", "none"), "peer_id", "listen_addrs",
        its static info, and for "span" "model_name", "model_hash" (hex), "first_layer",
        "n_layers", "sessions", "kv_used_bytes", "kv_budget_bytes", "max_positions", "hidden";
        "refusals" counts the errors it answered by code. Raises NetworkError on an error frame, FrameError on any other answer."""
    def local_info(self) -> dict[str, Any]:
        """What this node answers to Info now."""
    def serve(
        self,
        serve: None | Literal["echo"] | DecoderSpan,
        *,
        model_name: str | None = None,
        model_hash: bytes | None = None,
        kv_budget_bytes: int = ...,
        idle_timeout: float = 300.0,
        max_positions: int | None = None,
        info: dict[str, Any] | None = None,
        sessions_per_peer: int = 1024,
        kv_bytes_per_peer: int | None = None,
    ) -> None:
        """Serves `serve` from now on (the constructor's arguments, same meaning); drops the
        previous handler's sessions; merges `info` into the static Info."""
    def seed(self, model: str, items: dict[str, bytes | tuple[str | os.PathLike[str], int, int]]) -> None:
        """Serves ``items`` (bytes, or ``(path, offset, length)`` file ranges) as model ``model``
        over the blob protocol, replacing what was served under that id."""
    def unseed(self, model: str) -> None: ...
    def blob_list(self, peer: str, addrs: Sequence[str] = ..., timeout: float | None = None) -> dict[str, Any]:
        """``{"models": {model id: {item: length}}}``: what ``peer`` serves over the blob protocol."""
    def blob_read(
        self, peer: str, model: str, item: str, offset: int, length: int, addrs: Sequence[str] = ...,
        timeout: float | None = None,
    ) -> bytes:
        """``length`` bytes (at most 4 MiB) of an item ``peer`` serves, from ``offset``."""
    def session_count(self) -> int: ...
    def drain(self) -> None:
        """Takes no new sessions (the worker is leaving); held ones carry on."""
    def hand_over(self, targets: list[tuple[str, int, int]], timeout: float | None = None) -> list[dict[str, Any]]:
        """Hands each held session, with its KV cache, to the first of `targets` (peer id,
        first layer, layer count) serving its layers that takes it; one dict per session:
        `session`, `to` (None when it stayed), `error`, `positions`, `bytes`, `seconds`."""
    def moves_untold(self) -> int:
        """Sessions handed over whose End node has not yet asked for them here."""
    def close(self) -> None: ...
    def __enter__(self) -> Node: ...
    def __exit__(self, *exc: object) -> None: ...
