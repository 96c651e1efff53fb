//! Private meshes: a 256-bit key shared by every node of a mesh. Each TCP connection is
//! wrapped in libp2p's pre-shared-key private network layer (PSK v1: XSalsa20 keyed by the
//! shared key, under Noise), so a peer without the key, or with another one, cannot complete
//! the Noise handshake: it cannot join the DHT, announce layers or send a frame. QUIC brings
//! its own TLS handshake, which that layer cannot wrap, so a keyed node neither listens nor
//! dials over QUIC (see `behaviour`).
//!
//! The file format is go-libp2p's and IPFS's `swarm.key` (`/key/swarm/psk/1.0.0/`, `/base16/`,
//! 64 hex digits), so keys made by other tools work here too.

use std::io::Write;
use std::path::Path;
use std::str::FromStr;

use libp2p::pnet::PreSharedKey;

use crate::error::{Error, Result};

/// A mesh's shared key.
#[derive(Clone, Copy)]
pub struct NetworkKey(PreSharedKey);

impl std::fmt::Debug for NetworkKey {
    /// The fingerprint only: the key never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NetworkKey({})", self.fingerprint())
    }
}

impl NetworkKey {
    /// Reads a key file; a clear error naming the file when it is missing or not a key.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::InvalidArgument(format!("cannot read the network key {}: {e}", path.display())))?;
        PreSharedKey::from_str(&text).map(NetworkKey).map_err(|e| {
            Error::InvalidArgument(format!(
                "{} is not a network key ({e}); make one with `meshpy keygen FILE`",
                path.display()
            ))
        })
    }

    /// Writes a new random key to `path`, readable by its owner only; refuses to overwrite a
    /// file (a mesh's nodes would lose each other).
    pub fn generate(path: &Path) -> Result<Self> {
        let mut bytes = [0u8; 32];
        getrandom::getrandom(&mut bytes).map_err(|e| Error::Network(format!("no randomness for a network key: {e}")))?;
        let key = NetworkKey(PreSharedKey::new(bytes));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => {
                Error::InvalidArgument(format!("{} exists; not overwriting a network key", path.display()))
            }
            _ => Error::InvalidArgument(format!("cannot create {}: {e}", path.display())),
        })?;
        writeln!(file, "{}", key.0)
            .map_err(|e| Error::InvalidArgument(format!("cannot write {}: {e}", path.display())))?;
        Ok(key)
    }

    /// A short public digest of the key, for logs and for telling meshes apart.
    pub fn fingerprint(&self) -> String {
        self.0.fingerprint().to_string()
    }

    pub(crate) fn psk(&self) -> PreSharedKey {
        self.0
    }
}
