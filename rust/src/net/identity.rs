//! A node's persistent Ed25519 identity: one key file in the node directory, created on first
//! start (owner read/write only), so a node keeps its peer id across restarts and the provider
//! records other peers hold for it stay valid.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;

use crate::error::{Error, Result};

/// Name of the key file inside a node directory.
pub const KEY_FILE_NAME: &str = "identity.key";

/// The key file of `node_dir`.
pub fn key_path(node_dir: &Path) -> PathBuf {
    node_dir.join(KEY_FILE_NAME)
}

/// Loads the identity of `node_dir`, or creates the directory and a new Ed25519 key (file mode
/// 0600 on Unix) when there is none yet. A key file that does not decode is an
/// [`Error::Identity`]: it is never overwritten, since that would silently change the peer id.
pub fn load_or_create(node_dir: &Path) -> Result<Keypair> {
    let path = key_path(node_dir);
    match fs::read(&path) {
        Ok(bytes) => decode(&path, &bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(node_dir, &path),
        Err(source) => Err(Error::Io { path, source }),
    }
}

/// Decodes a key file's bytes (libp2p's protobuf key encoding), accepting only Ed25519.
fn decode(path: &Path, bytes: &[u8]) -> Result<Keypair> {
    let keypair = Keypair::from_protobuf_encoding(bytes).map_err(|e| Error::Identity {
        path: path.to_path_buf(),
        detail: format!("{e} ({} bytes)", bytes.len()),
    })?;
    if keypair.key_type() != libp2p::identity::KeyType::Ed25519 {
        return Err(Error::Identity {
            path: path.to_path_buf(),
            detail: format!("a {:?} key; meshpy nodes use Ed25519", keypair.key_type()),
        });
    }
    Ok(keypair)
}

/// Writes a fresh key with `create_new`, so two nodes started on one directory at once do not
/// both write (the loser reads the winner's key).
fn create(node_dir: &Path, path: &Path) -> Result<Keypair> {
    let io_err = |source| Error::Io { path: path.to_path_buf(), source };
    fs::create_dir_all(node_dir).map_err(|source| Error::Io { path: node_dir.to_path_buf(), source })?;
    let keypair = Keypair::generate_ed25519();
    let bytes = keypair.to_protobuf_encoding().map_err(|e| Error::Identity {
        path: path.to_path_buf(),
        detail: format!("cannot encode the new key: {e}"),
    })?;
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = match options.open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let bytes = fs::read(path).map_err(io_err)?;
            return decode(path, &bytes);
        }
        Err(e) => return Err(io_err(e)),
    };
    file.write_all(&bytes).and_then(|()| file.sync_all()).map_err(io_err)?;
    Ok(keypair)
}
