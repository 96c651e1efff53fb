//! Bindings for `net`: a `Node` class wrapping the libp2p node. Arguments are parsed into Rust
//! values first; every call that waits on the network releases the GIL. A node may serve
//! nothing, echo frames, or a `DecoderSpan` (answered in Rust, no Python per token).

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use numpy::{PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray2};

use super::json::{dict_to_map, value_to_dict};
use super::model::PyDecoderSpan;
use super::torch_span::PyTorchSpan;
use super::wire::{entries_of, matrix_of, model_id, PyEntry};
use super::to_py_err;
use crate::error::Error;
use crate::net::blobs::Blob;
use crate::net::{
    EchoHandler, FrameHandler, Multiaddr, NetworkKey, Reachability, Node, NodeConfig, PeerId, Providers, Transport,
};
use crate::span::{self, ChainHop, CpuSpan, Hop, SessionLimits, SpanBackend, SpanHandler};
use crate::wire::{DType, Limits, ModelId, Span, MODEL_HASH_LEN};

/// The arguments `forward` and `forward_chain` share, parsed.
struct StepArgs {
    model: ModelId,
    wire: DType,
    timeout: Option<Duration>,
    entries: Vec<crate::wire::Entry>,
    data: Vec<f32>,
    rows: usize,
    width: usize,
}

impl StepArgs {
    fn parse(
        model_hash: &[u8],
        model_name: &str,
        wire_dtype: &str,
        timeout: Option<f64>,
        entries: &[PyEntry],
        hidden: &PyReadonlyArray2<'_, f32>,
    ) -> PyResult<Self> {
        let (data, shape) = matrix_of(hidden)?;
        let [rows, width] = [shape.dims()[0], shape.dims()[1]].map(|n| n as usize);
        Ok(StepArgs {
            model: model_id(model_hash, model_name)?,
            wire: DType::from_name(wire_dtype).map_err(to_py_err)?,
            timeout: timeout.map(|t| seconds(t, "timeout")).transpose()?,
            entries: entries_of(entries),
            data,
            rows,
            width,
        })
    }
}

/// What `forward_chain` returns: the hops' outputs, and the failure that ended the route early.
type ChainAnswer<'py> = (Vec<Bound<'py, PyArray2<f32>>>, Option<Py<pyo3::exceptions::PyBaseException>>);

fn invalid(message: String) -> PyErr {
    to_py_err(Error::InvalidArgument(message))
}

fn parse_addr(addr: &str) -> PyResult<Multiaddr> {
    addr.parse().map_err(|e| invalid(format!("bad multiaddr {addr:?}: {e}")))
}

fn parse_peer(peer: &str) -> PyResult<PeerId> {
    peer.parse().map_err(|e| invalid(format!("bad peer id {peer:?}: {e}")))
}

fn seconds(value: f64, what: &str) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| PyValueError::new_err(format!("{what} must be a positive number of seconds, got {value}")))
}

/// Providers as Python sees them: (peer id, [multiaddr, ...]) each.
type PyProviders = Vec<(String, Vec<String>)>;

fn providers_to_py(providers: Providers) -> PyProviders {
    providers.into_iter().map(|(peer, addrs)| (peer.to_string(), addrs.iter().map(ToString::to_string).collect())).collect()
}

/// A DHT key: `bytes`, or `str` taken as UTF-8.
fn key_bytes(key: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    if let Ok(s) = key.extract::<String>() {
        return Ok(s.into_bytes());
    }
    key.extract::<Vec<u8>>().map_err(|_| PyValueError::new_err("a DHT key is bytes or str"))
}

/// A libp2p node of the mesh.
#[pyclass(name = "Node", module = "meshpy._native", frozen)]
pub struct PyNode {
    node: Node,
}

/// A span handler's limits from the Python arguments (`None`: the model's context, the whole
/// budget).
fn session_limits(
    kv_budget_bytes: u64,
    idle_timeout: f64,
    max_positions: Option<usize>,
    sessions_per_peer: usize,
    kv_bytes_per_peer: Option<u64>,
) -> PyResult<SessionLimits> {
    Ok(SessionLimits {
        kv_budget_bytes,
        idle_timeout: seconds(idle_timeout, "idle_timeout")?,
        max_positions: max_positions.unwrap_or(usize::MAX),
        sessions_per_peer,
        kv_bytes_per_peer: kv_bytes_per_peer.unwrap_or(u64::MAX),
    })
}

#[pymethods]
impl PyNode {
    /// Starts a node: loads or creates the identity in `node_dir`, listens on `host:port`
    /// (0: a free port) over `transport` ("tcp", "quic", "both"), joins through `bootstrap`
    /// multiaddrs. `serve` is None (refuse requests), "echo", or a `DecoderSpan`, which then
    /// needs `model_name` and the 32-byte `model_hash`. `info` (a dict of JSON values) is the
    /// static part of the node's `Info` replies. Provider records this node stores expire
    /// `provider_ttl` seconds after their last announcement; its own are re-announced every
    /// quarter of that. `dht_server=False` makes a client that queries the DHT without
    /// serving it (for End nodes and `meshpy status`: they come and go). One peer may send
    /// `peer_rate` requests per second (0: no limit), start `sessions_per_peer` sessions and
    /// hold `kv_bytes_per_peer` of KV cache with them (None: the whole budget); past those its
    /// requests are refused `overloaded`. `mdns=True` finds other nodes on the local network
    /// (multicast DNS on every non-loopback interface), so a mesh forms without bootstrap.
    /// `relay_server=True` relays connections for nodes that cannot reach each other (nodes
    /// behind a NAT reserve a slot on it); `hole_punch=False` keeps relayed connections so
    /// instead of trying a direct one.
    #[new]
    #[pyo3(signature = (
        node_dir, port = 0, transport = "tcp", bootstrap = Vec::new(), serve = None, *,
        host = "127.0.0.1", model_name = None, model_hash = None, request_timeout = 60.0,
        query_timeout = 30.0, max_frame_bytes = None, kv_budget_bytes = 512 << 20,
        idle_timeout = 300.0, max_positions = None, info = None, provider_ttl = 600.0,
        dht_server = true, network_key = None, allow_peers = None, peer_rate = 2000.0,
        sessions_per_peer = 1024, kv_bytes_per_peer = None, mdns = false, relay_server = false,
        hole_punch = true,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        node_dir: PathBuf,
        port: u16,
        transport: &str,
        bootstrap: Vec<String>,
        serve: Option<&Bound<'_, PyAny>>,
        host: &str,
        model_name: Option<String>,
        model_hash: Option<Vec<u8>>,
        request_timeout: f64,
        query_timeout: f64,
        max_frame_bytes: Option<u64>,
        kv_budget_bytes: u64,
        idle_timeout: f64,
        max_positions: Option<usize>,
        info: Option<&Bound<'_, PyAny>>,
        provider_ttl: f64,
        dht_server: bool,
        network_key: Option<PathBuf>,
        allow_peers: Option<Vec<String>>,
        peer_rate: f64,
        sessions_per_peer: usize,
        kv_bytes_per_peer: Option<u64>,
        mdns: bool,
        relay_server: bool,
        hole_punch: bool,
    ) -> PyResult<Self> {
        let mut config = NodeConfig::new(node_dir);
        config.port = port;
        config.transport = transport.parse::<Transport>().map_err(to_py_err)?;
        config.listen_host = host.parse::<IpAddr>().map_err(|e| invalid(format!("bad host {host:?}: {e}")))?;
        config.bootstrap = bootstrap.iter().map(|a| parse_addr(a)).collect::<PyResult<_>>()?;
        config.request_timeout = seconds(request_timeout, "request_timeout")?;
        config.query_timeout = seconds(query_timeout, "query_timeout")?;
        config.provider_ttl = seconds(provider_ttl, "provider_ttl")?;
        config.dht_server = dht_server;
        config.mdns = mdns;
        config.relay_server = relay_server;
        config.hole_punch = hole_punch;
        config.network_key = network_key.map(|path| NetworkKey::load(&path)).transpose().map_err(to_py_err)?;
        config.allow_peers = allow_peers.map(|peers| peers.iter().map(|p| parse_peer(p)).collect::<PyResult<_>>()).transpose()?;
        if !(peer_rate.is_finite() && peer_rate >= 0.0) {
            return Err(invalid(format!("peer_rate must be a number of requests per second, 0 for no limit; got {peer_rate}")));
        }
        config.peer_limits.requests_per_second = peer_rate;
        if let Some(max) = max_frame_bytes {
            config.limits = Limits { max_frame_bytes: max, ..Limits::default() };
        }
        if let Some(info) = info.filter(|i| !i.is_none()) {
            config.info = dict_to_map(info, "info")?;
        }
        config.handler = match serve {
            None => None,
            Some(s) if s.is_none() => None,
            Some(s) => Some(handler_of(s, &config.limits, model_name, model_hash, session_limits(
                kv_budget_bytes,
                idle_timeout,
                max_positions,
                sessions_per_peer,
                kv_bytes_per_peer,
            )?)?),
        };
        let node = py.detach(|| Node::start(config)).map_err(to_py_err)?;
        Ok(PyNode { node })
    }

    /// This node's peer id (base58).
    #[getter]
    fn peer_id(&self) -> String {
        self.node.peer_id().to_string()
    }

    /// Listen addresses, each ending in /p2p/<peer id>.
    fn listen_addrs(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        let addrs = py.detach(|| self.node.listen_addrs()).map_err(to_py_err)?;
        Ok(addrs.iter().map(ToString::to_string).collect())
    }

    /// Peer ids with an open connection.
    fn connected_peers(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        let peers = py.detach(|| self.node.connected_peers()).map_err(to_py_err)?;
        Ok(peers.iter().map(ToString::to_string).collect())
    }

    /// Every open connection: dicts with `peer`, `addr` (a `/p2p-circuit` one when relayed),
    /// `relayed` and `outbound` (this node dialed it).
    fn connections<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let connections = py.detach(|| self.node.connections()).map_err(to_py_err)?;
        connections
            .iter()
            .map(|c| {
                let d = PyDict::new(py);
                d.set_item("peer", c.peer.to_string())?;
                d.set_item("addr", c.addr.to_string())?;
                d.set_item("relayed", c.relayed)?;
                d.set_item("outbound", c.outbound)?;
                Ok(d)
            })
            .collect()
    }

    /// Whether others can reach this node, as peers' dial-back probes (AutoNAT) tell: a dict
    /// with `reachability` ("unknown", "public" or "private") and `relayed_through` (the
    /// relays holding a slot for it when private).
    fn reachability<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let r = py.detach(|| self.node.reachability()).map_err(to_py_err)?;
        let d = PyDict::new(py);
        d.set_item("reachability", r.name())?;
        let relays: Vec<String> = match &r {
            Reachability::Private { relays } => relays.iter().map(ToString::to_string).collect(),
            _ => Vec::new(),
        };
        d.set_item("relayed_through", relays)?;
        Ok(d)
    }

    /// Connects to a multiaddr; returns the peer id.
    fn dial(&self, py: Python<'_>, addr: &str) -> PyResult<String> {
        let addr = parse_addr(addr)?;
        Ok(py.detach(|| self.node.dial(addr)).map_err(to_py_err)?.to_string())
    }

    /// Takes no new sessions from now on (the worker is leaving); held ones carry on.
    fn drain(&self, py: Python<'_>) {
        py.detach(|| self.node.drain());
    }

    /// Hands each session the served span holds to another worker of its layers, with its KV
    /// cache: to the first of `targets` (peer id, first layer, layer count) serving the
    /// session's layers that takes it. Blocks while the transfers run (each at most `timeout`
    /// seconds). A list of dicts, one per session: `session` (int), `to` (peer id, or None
    /// when it stayed), `error` (why it stayed, else None), `positions`, `bytes` (the state
    /// sent), `seconds` (its requests held back that long).
    #[pyo3(signature = (targets, timeout = None))]
    fn hand_over<'py>(&self, py: Python<'py>, targets: Vec<(String, u32, u32)>, timeout: Option<f64>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let targets = targets
            .iter()
            .map(|(peer, first, count)| Ok((parse_peer(peer)?, Span { first_layer: *first, layer_count: *count })))
            .collect::<PyResult<Vec<_>>>()?;
        let timeout = timeout.map(|t| seconds(t, "timeout")).transpose()?;
        let handed = py.detach(|| self.node.hand_over(&targets, timeout));
        handed
            .iter()
            .map(|h| {
                let d = PyDict::new(py);
                d.set_item("session", h.session.0)?;
                d.set_item("to", h.to.as_ref().ok().map(ToString::to_string))?;
                d.set_item("error", h.to.as_ref().err())?;
                d.set_item("positions", h.positions)?;
                d.set_item("bytes", h.bytes)?;
                d.set_item("seconds", h.seconds)?;
                Ok(d)
            })
            .collect()
    }

    /// Sessions handed over whose End node has not yet asked for them here (it learns where
    /// they went when it does); a leaving worker waits for 0.
    fn moves_untold(&self, py: Python<'_>) -> usize {
        py.detach(|| self.node.moves_untold())
    }

    /// Runs a DHT bootstrap and waits for it.
    fn bootstrap(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.node.bootstrap()).map_err(to_py_err)
    }

    /// Announces this node as a provider of `key` (bytes or str).
    fn start_providing(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<()> {
        let key = key_bytes(key)?;
        py.detach(|| self.node.start_providing(&key)).map_err(to_py_err)
    }

    /// Stops announcing this node as a provider of `key` (bytes or str); other nodes forget
    /// it within the provider TTL.
    fn stop_providing(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<()> {
        let key = key_bytes(key)?;
        py.detach(|| self.node.stop_providing(&key)).map_err(to_py_err)
    }

    /// Providers of `key`: a list of (peer id, [multiaddr, ...]).
    fn get_providers(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<PyProviders> {
        let key = key_bytes(key)?;
        let providers = py.detach(|| self.node.get_providers(&key)).map_err(to_py_err)?;
        Ok(providers_to_py(providers))
    }

    /// Providers of each of `keys` (bytes or str), looked up concurrently: one list of
    /// (peer id, [multiaddr, ...]) per key, in key order. Raises RequestTimeoutError if any
    /// lookup failed without finding a provider.
    fn get_providers_many(&self, py: Python<'_>, keys: Vec<Bound<'_, PyAny>>) -> PyResult<Vec<PyProviders>> {
        let keys = keys.iter().map(key_bytes).collect::<PyResult<Vec<_>>>()?;
        let all = py.detach(|| self.node.get_providers_many(keys)).map_err(to_py_err)?;
        Ok(all.into_iter().map(providers_to_py).collect())
    }

    /// Sends a frame to `peer` and returns the response frame (an error frame is a response
    /// too). Raises RequestTimeoutError after `timeout` seconds (default: the node's), and
    /// NetworkError when the peer cannot be reached or drops the connection.
    #[pyo3(signature = (peer, frame, timeout = None))]
    fn request<'py>(&self, py: Python<'py>, peer: &str, frame: &[u8], timeout: Option<f64>) -> PyResult<Bound<'py, PyBytes>> {
        let peer = parse_peer(peer)?;
        // One memcpy into an owned buffer, then the GIL is released for the round trip.
        let frame = frame.to_vec();
        let timeout = timeout.map(|t| seconds(t, "timeout")).transpose()?;
        let reply = py.detach(|| self.node.request(peer, frame, timeout)).map_err(to_py_err)?;
        Ok(PyBytes::new(py, &reply))
    }

    /// Runs hidden states through one hop of the span protocol: layers `first_layer ..
    /// first_layer + layer_count` of the model (`model_hash`, `model_name`) on `peer`, for
    /// `entries` (`(session, step, start_pos, n_tokens)`, the rows of `hidden` in order),
    /// float32 `(rows, width)` sent as `wire_dtype` ("f32", "bf16", "f16"). Returns the
    /// worker's output, float32 of the same shape. The GIL is released from encoding to
    /// decoding. Raises WorkerError (its `code`, `recoverable`, `peer`) when the worker
    /// refuses or answers with something other than this request's result, ShapeError when
    /// the rows do not match the entries, NetworkError / RequestTimeoutError from the network.
    #[pyo3(signature = (peer, model_hash, model_name, first_layer, layer_count, entries, hidden, wire_dtype = "f32", timeout = None, width_out = None))]
    #[allow(clippy::too_many_arguments)]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        peer: &str,
        model_hash: &[u8],
        model_name: &str,
        first_layer: u32,
        layer_count: u32,
        entries: Vec<PyEntry>,
        hidden: PyReadonlyArray2<'py, f32>,
        wire_dtype: &str,
        timeout: Option<f64>,
        width_out: Option<usize>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let peer = parse_peer(peer)?;
        let StepArgs { model, wire, timeout, entries, data, rows, width } =
            StepArgs::parse(model_hash, model_name, wire_dtype, timeout, &entries, &hidden)?;
        let width_out = width_out.unwrap_or(width);
        let hop = Hop { model: &model, span: Span { first_layer, layer_count }, entries: &entries, wire, width_out };
        let out = py.detach(|| span::forward(&self.node, peer, hop, &data, width, timeout)).map_err(to_py_err)?;
        PyArray1::from_vec(py, out).reshape([rows, width_out])
    }

    /// forward_chain(route, model_hash, model_name, entries, hidden, wire_dtype="f32",
    /// timeout=None) -> (outputs, error): runs `hidden` through every hop of `route` (tuples
    /// of peer id, its addresses as multiaddr strings, first layer, layer count, and the width
    /// of the rows it answers: `width_out` of `forward`) as a chained
    /// route: each worker passes its output to the next, and every worker's output comes
    /// back to this node. `outputs` are the hops' outputs in route order up to the first
    /// that failed, `error` that failure (the exception `forward` would raise) or None.
    /// Raises only for bad arguments, before anything is sent. GIL released throughout.
    #[pyo3(signature = (route, model_hash, model_name, entries, hidden, wire_dtype = "f32", timeout = None))]
    #[allow(clippy::too_many_arguments)]
    fn forward_chain<'py>(
        &self,
        py: Python<'py>,
        route: Vec<(String, Vec<String>, u32, u32, usize)>,
        model_hash: &[u8],
        model_name: &str,
        entries: Vec<PyEntry>,
        hidden: PyReadonlyArray2<'py, f32>,
        wire_dtype: &str,
        timeout: Option<f64>,
    ) -> PyResult<ChainAnswer<'py>> {
        let route = route
            .iter()
            .map(|(peer, addrs, first_layer, layer_count, width_out)| {
                Ok(ChainHop {
                    peer: parse_peer(peer)?,
                    // Hints a provider gave about itself: one that does not parse is left out.
                    addrs: addrs.iter().filter_map(|a| a.parse().ok()).collect(),
                    span: Span { first_layer: *first_layer, layer_count: *layer_count },
                    width_out: *width_out,
                })
            })
            .collect::<PyResult<Vec<_>>>()?;
        let StepArgs { model, wire, timeout, entries, data, rows, width } =
            StepArgs::parse(model_hash, model_name, wire_dtype, timeout, &entries, &hidden)?;
        let outcome = py
            .detach(|| span::forward_chain(&self.node, &route, &model, &entries, wire, &data, width, timeout))
            .map_err(to_py_err)?;
        let outputs = outcome
            .outputs
            .into_iter()
            .zip(&route)
            .map(|(out, hop)| PyArray1::from_vec(py, out).reshape([rows, hop.width_out]))
            .collect::<PyResult<Vec<_>>>()?;
        let error = outcome.failure.map(|(_, err)| to_py_err(err).into_value(py));
        Ok((outputs, error))
    }

    /// Asks `peer` to describe itself; returns its `Info` reply as a dict (keys: "mode",
    /// "peer_id", "listen_addrs", the static info it was given, and per mode: for "span"
    /// "model_name", "model_hash" (hex), "first_layer", "n_layers", "sessions",
    /// "kv_used_bytes", "kv_budget_bytes", "max_positions", "hidden"). Raises NetworkError
    /// when it answers with an error frame, FrameError when with anything else.
    #[pyo3(signature = (peer, timeout = None))]
    fn info<'py>(&self, py: Python<'py>, peer: &str, timeout: Option<f64>) -> PyResult<Bound<'py, PyAny>> {
        let peer = parse_peer(peer)?;
        let timeout = timeout.map(|t| seconds(t, "timeout")).transpose()?;
        let info = py.detach(|| self.node.info(peer, timeout)).map_err(to_py_err)?;
        value_to_dict(py, &info)
    }

    /// What this node answers to `Info` now, as a dict.
    fn local_info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let info = py.detach(|| self.node.describe());
        value_to_dict(py, &info)
    }

    /// Sets what the node serves from now on, with the constructor's meaning of each argument:
    /// `serve` None (refuse forwards), "echo", or a `DecoderSpan` with `model_name` and
    /// `model_hash`. So a worker can join the mesh first, look at what others serve, then load
    /// and serve its layers. The previous handler's sessions are dropped. `info` is merged
    /// into the static part of the node's Info replies.
    #[pyo3(signature = (
        serve, *, model_name = None, model_hash = None, kv_budget_bytes = 512 << 20,
        idle_timeout = 300.0, max_positions = None, info = None, sessions_per_peer = 1024,
        kv_bytes_per_peer = None,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn serve(
        &self,
        py: Python<'_>,
        serve: Option<&Bound<'_, PyAny>>,
        model_name: Option<String>,
        model_hash: Option<Vec<u8>>,
        kv_budget_bytes: u64,
        idle_timeout: f64,
        max_positions: Option<usize>,
        info: Option<&Bound<'_, PyAny>>,
        sessions_per_peer: usize,
        kv_bytes_per_peer: Option<u64>,
    ) -> PyResult<()> {
        let session_limits = session_limits(kv_budget_bytes, idle_timeout, max_positions, sessions_per_peer, kv_bytes_per_peer)?;
        let handler = match serve.filter(|s| !s.is_none()) {
            None => None,
            Some(s) => Some(handler_of(s, &self.node.limits(), model_name, model_hash, session_limits)?),
        };
        let info = info.filter(|i| !i.is_none()).map(|i| dict_to_map(i, "info")).transpose()?;
        py.detach(|| {
            if let Some(info) = info {
                self.node.set_info(info);
            }
            self.node.set_handler(handler);
        });
        Ok(())
    }

    /// Serves model `model` over the blob protocol from now on (replacing what was served
    /// under that id): `items` maps each item's name to its bytes, or to `(path, offset,
    /// length)`, a range of a file (opened now, and checked to hold that range).
    fn seed(&self, model: String, items: &Bound<'_, PyDict>) -> PyResult<()> {
        let mut blobs = std::collections::BTreeMap::new();
        // One open file per path, however many items it holds (a model has hundreds of tensors).
        let mut files: std::collections::HashMap<PathBuf, (Arc<std::fs::File>, u64)> = std::collections::HashMap::new();
        for (name, value) in items.iter() {
            let name: String = name.extract()?;
            let blob = if let Ok(bytes) = value.cast::<PyBytes>() {
                Blob::Bytes(Arc::from(bytes.as_bytes()))
            } else {
                let (path, offset, len): (PathBuf, u64, u64) = value.extract().map_err(|_| {
                    invalid(format!("item {name:?} must be bytes or (path, offset, length)"))
                })?;
                let (file, size) = match files.get(&path) {
                    Some(open) => open.clone(),
                    None => {
                        let io = |e| to_py_err(Error::Io { path: path.clone(), source: e });
                        let file = std::fs::File::open(&path).map_err(io)?;
                        let size = file.metadata().map_err(io)?.len();
                        files.insert(path.clone(), (Arc::new(file), size));
                        files[&path].clone()
                    }
                };
                if offset.checked_add(len).is_none_or(|end| end > size) {
                    return Err(invalid(format!("item {name:?}: bytes {offset}..+{len} are past the end of {} ({size} bytes)", path.display())));
                }
                Blob::File { file, offset, len }
            };
            blobs.insert(name, blob);
        }
        self.node.seeds().set(model, blobs);
        Ok(())
    }

    /// Stops serving `model` over the blob protocol.
    fn unseed(&self, model: &str) {
        self.node.seeds().remove(model);
    }

    /// What `peer` serves over the blob protocol: `{"models": {model id: {item: length}}}`.
    /// `addrs` are dialed if no connection is up. NetworkError if it refuses or is unreachable.
    #[pyo3(signature = (peer, addrs = Vec::new(), timeout = None))]
    fn blob_list<'py>(&self, py: Python<'py>, peer: &str, addrs: Vec<String>, timeout: Option<f64>) -> PyResult<Bound<'py, PyAny>> {
        let answer = self.blob_request(py, peer, addrs, serde_json::json!({"op": "list"}), timeout)?;
        let value: serde_json::Value = serde_json::from_slice(&answer)
            .map_err(|e| to_py_err(Error::Frame(format!("{peer} sent a blob list that is not JSON: {e}"))))?;
        value_to_dict(py, &value)
    }

    /// `length` bytes (at most 4 MiB) of item `item` of model `model` from `offset`, read from
    /// `peer`. NetworkError if it refuses (not served there, past the end) or is unreachable.
    #[pyo3(signature = (peer, model, item, offset, length, addrs = Vec::new(), timeout = None))]
    #[allow(clippy::too_many_arguments)]
    fn blob_read<'py>(
        &self,
        py: Python<'py>,
        peer: &str,
        model: &str,
        item: &str,
        offset: u64,
        length: u64,
        addrs: Vec<String>,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let request = serde_json::json!({"op": "read", "model": model, "item": item, "offset": offset, "len": length});
        let answer = self.blob_request(py, peer, addrs, request, timeout)?;
        if answer.len() as u64 != length {
            return Err(to_py_err(Error::Frame(format!("{peer} sent {} bytes for a {length}-byte read", answer.len()))));
        }
        Ok(PyBytes::new(py, &answer))
    }

    /// Sessions the served span holds (0 for echo or no handler).
    fn session_count(&self, py: Python<'_>) -> usize {
        py.detach(|| self.node.session_count())
    }

    /// Stops the node (listeners closed, runtime stopped). Idempotent.
    fn close(&self, py: Python<'_>) {
        py.detach(|| self.node.shutdown());
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(&self, py: Python<'_>, _t: Py<PyAny>, _v: Py<PyAny>, _tb: Py<PyAny>) {
        self.close(py);
    }
}

impl PyNode {
    fn blob_request(&self, py: Python<'_>, peer: &str, addrs: Vec<String>, request: serde_json::Value, timeout: Option<f64>) -> PyResult<Vec<u8>> {
        let peer = parse_peer(peer)?;
        let addrs = addrs.iter().map(|a| parse_addr(a)).collect::<PyResult<Vec<_>>>()?;
        let timeout = timeout.map(|t| seconds(t, "timeout")).transpose()?;
        let body = request.to_string().into_bytes();
        py.detach(|| self.node.blob_request(peer, addrs, body, timeout)).map_err(to_py_err)
    }
}

/// The handler `serve` names.
fn handler_of(
    serve: &Bound<'_, PyAny>,
    limits: &Limits,
    model_name: Option<String>,
    model_hash: Option<Vec<u8>>,
    session_limits: SessionLimits,
) -> PyResult<Arc<dyn FrameHandler>> {
    if let Ok(mode) = serve.extract::<String>() {
        return match mode.as_str() {
            "echo" => Ok(Arc::new(EchoHandler::new(*limits))),
            _ => Err(invalid(format!("serve must be None, \"echo\", a DecoderSpan or a TorchSpan, got {mode:?}"))),
        };
    }
    let backend: Arc<dyn SpanBackend> = if let Ok(span) = serve.cast::<PyDecoderSpan>() {
        let (span, pool) = span.get().parts();
        Arc::new(CpuSpan { span, pool })
    } else if let Ok(span) = serve.cast::<PyTorchSpan>() {
        span.get().backend()
    } else {
        return Err(invalid("serve must be None, \"echo\", a DecoderSpan or a TorchSpan".to_string()));
    };
    let (Some(name), Some(hash)) = (model_name, model_hash) else {
        return Err(invalid("serving a DecoderSpan needs model_name and model_hash".to_string()));
    };
    let hash: [u8; MODEL_HASH_LEN] = hash
        .as_slice()
        .try_into()
        .map_err(|_| invalid(format!("model_hash must be {MODEL_HASH_LEN} bytes, got {}", hash.len())))?;
    Ok(Arc::new(SpanHandler::with_backend(backend, ModelId { hash, name }, *limits, session_limits)))
}

/// Registers the net classes.
/// generate_network_key(path) -> str: writes a new random network key to `path` (owner-only,
/// never over an existing file) and returns its fingerprint.
#[pyfunction]
fn generate_network_key(path: PathBuf) -> PyResult<String> {
    Ok(NetworkKey::generate(&path).map_err(to_py_err)?.fingerprint())
}

/// network_key_fingerprint(path) -> str: the fingerprint of the key in `path` (a clear error
/// when the file is missing or not a key).
#[pyfunction]
fn network_key_fingerprint(path: PathBuf) -> PyResult<String> {
    Ok(NetworkKey::load(&path).map_err(to_py_err)?.fingerprint())
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyNode>()?;
    m.add_function(wrap_pyfunction!(generate_network_key, m)?)?;
    m.add_function(wrap_pyfunction!(network_key_fingerprint, m)?)?;
    Ok(())
}
