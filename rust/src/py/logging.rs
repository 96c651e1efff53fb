//! Rust-side logs (sessions opened, closed, expired; refused requests) on stderr, for the
//! processes that serve: `meshpy worker` and `meshpy bootstrap` turn them on at their
//! logging level. They go straight to stderr, not through Python's `logging`, so the
//! serving threads never wait for the GIL to log.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

/// Environment variable adding per-library log levels, as `target=level` pairs separated by
/// commas (to look inside libp2p: `libp2p_dcutr=debug`).
const LOG_TARGETS_ENV: &str = "MESHPY_LOG_TARGETS";

/// Sends Rust log events at `level` ("error", "warning", "info", "debug") and above to
/// stderr. The first call sets the level for the life of the process; later calls do
/// nothing and return False.
#[pyfunction]
fn init_logging(level: &str) -> PyResult<bool> {
    let level = match level.to_ascii_lowercase().as_str() {
        "error" => Level::ERROR,
        "warning" | "warn" => Level::WARN,
        "info" => Level::INFO,
        "debug" => Level::DEBUG,
        "trace" => Level::TRACE,
        other => return Err(PyValueError::new_err(format!("unknown log level {other:?}"))),
    };
    // Our events at `level`; libraries' (libp2p logs every listener at info) at warnings,
    // unless `MESHPY_LOG_TARGETS` names some ("libp2p_dcutr=debug,libp2p_swarm=debug").
    let mut filter = Targets::new().with_target("meshpy_native", level).with_default(Level::WARN.min(level));
    if let Ok(targets) = std::env::var(LOG_TARGETS_ENV) {
        let extra: Targets = targets.parse().map_err(|e| PyValueError::new_err(format!("{LOG_TARGETS_ENV}={targets:?}: {e}")))?;
        for (target, level) in extra.iter() {
            filter = filter.with_target(target, level);
        }
    }
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(false).with_filter(filter);
    Ok(tracing_subscriber::registry().with(layer).try_init().is_ok())
}

/// Registers `init_logging`.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(init_logging, m)?)?;
    Ok(())
}
