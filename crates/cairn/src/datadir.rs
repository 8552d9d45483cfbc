//! The data directory: its recorded format version and the generated credentials.
//!
//! Layout:
//! - `FORMAT`: the format version of the directory (one line: `cairn-data <n>`).
//!   A binary refuses a directory newer than it knows.
//! - `node_id`: this node's id (16 hex digits), chosen at random once.
//! - `meta.redb`: the metadata tables; `raft/`: the metadata Raft log (`raft/log/`,
//!   whose entries after the tables' last checkpoint are applied again at start),
//!   its vote (`raft/state`) and snapshots (`raft/snapshots/`).
//! - `blocks/`, `tmp/`: the block store.
//! - `credentials`: the generated root key pair (mode 0600), if one was generated.

use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};

use cairn_types::DATA_DIR_FORMAT_VERSION;

const FORMAT_FILE: &str = "FORMAT";

/// Creates the directory (recording the current format) or checks its format.
pub fn prepare(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir)
        .with_context(|| format!("creating data directory {}", dir.display()))?;
    let f = dir.join(FORMAT_FILE);
    match fs::read_to_string(&f) {
        Ok(text) => {
            let v: u32 = text
                .trim()
                .strip_prefix("cairn-data ")
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("{} is not a cairn format file", f.display()))?;
            if v > DATA_DIR_FORMAT_VERSION {
                bail!(
                    "the data directory {} has format version {v}, newer than this cairn knows ({}); \
                     run a newer cairn on it (nothing was changed)",
                    dir.display(),
                    DATA_DIR_FORMAT_VERSION
                );
            }
            if v < DATA_DIR_FORMAT_VERSION {
                // Every older format opens as is (version 1 had no metadata command
                // log; version 2's is applied and removed when the metadata store
                // opens). Recorded first, so that an older binary refuses the
                // directory from now on.
                write_durably(
                    &f,
                    format!("cairn-data {DATA_DIR_FORMAT_VERSION}\n").as_bytes(),
                    0o644,
                )?;
                tracing::info!(
                    from = v,
                    to = DATA_DIR_FORMAT_VERSION,
                    "data directory format upgraded"
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let nonempty = fs::read_dir(dir)?.next().is_some();
            if nonempty {
                bail!(
                    "{} is not empty and holds no cairn {FORMAT_FILE} file; refusing to use it as a data directory",
                    dir.display()
                );
            }
            write_durably(
                &f,
                format!("cairn-data {DATA_DIR_FORMAT_VERSION}\n").as_bytes(),
                0o644,
            )
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", f.display())),
    }
}

const NODE_ID_FILE: &str = "node_id";

/// This node's id: read from `node_id`, or chosen at random (never 0) and written
/// durably the first time.
pub fn node_id(dir: &Path) -> Result<u64> {
    let f = dir.join(NODE_ID_FILE);
    match fs::read_to_string(&f) {
        Ok(text) => u64::from_str_radix(text.trim(), 16)
            .ok()
            .filter(|&id| id != 0)
            .with_context(|| format!("{} does not hold a node id", f.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = loop {
                let id: u64 = rand::random();
                if id != 0 {
                    break id;
                }
            };
            write_durably(&f, format!("{id:016x}\n").as_bytes(), 0o644)?;
            Ok(id)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", f.display())),
    }
}

/// Writes a small file durably: temp file, fsync, rename, directory fsync.
pub fn write_durably(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    if let Some(parent) = path.parent() {
        fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// A key pair as stored in `credentials`.
pub struct KeyPair {
    pub access_key: String,
    pub secret_key: String,
}

const ALNUM_UPPER: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
const SECRET_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn random_string(alphabet: &[u8], len: usize) -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..len)
        .map(|_| alphabet[rng.random_range(0..alphabet.len())] as char)
        .collect()
}

pub fn generate_key_pair() -> KeyPair {
    KeyPair {
        // Shaped like AWS's: 20 characters, a fixed prefix, upper case and digits.
        access_key: format!("CRN{}", random_string(ALNUM_UPPER, 17)),
        secret_key: random_string(SECRET_CHARS, 40),
    }
}

pub fn read_credentials(dir: &Path) -> Result<Option<KeyPair>> {
    let p = dir.join("credentials");
    let text = match fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
    };
    let mut ak = None;
    let mut sk = None;
    for line in text.lines() {
        if let Some((k, v)) = line.split_once('=') {
            match k.trim() {
                "access_key" => ak = Some(v.trim().to_string()),
                "secret_key" => sk = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    match (ak, sk) {
        (Some(access_key), Some(secret_key)) => Ok(Some(KeyPair {
            access_key,
            secret_key,
        })),
        _ => bail!("{} lacks access_key or secret_key", p.display()),
    }
}

const ADMIN_TOKEN_FILE: &str = "admin_token";

/// The admin token (for the admin API's commands that change the cluster): read
/// from `admin_token` (mode 0600), or generated and written there the first time.
pub fn admin_token(dir: &Path) -> Result<String> {
    secret_file(&dir.join(ADMIN_TOKEN_FILE))
}

/// A random secret kept in file `f` (mode 0600): read, or generated the first time.
pub fn secret_file(f: &Path) -> Result<String> {
    let f = f.to_path_buf();
    match fs::read_to_string(&f) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        Ok(_) => bail!("{} is empty", f.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let t = random_string(SECRET_CHARS, 40);
            write_durably(&f, format!("{t}\n").as_bytes(), 0o600)?;
            Ok(t)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", f.display())),
    }
}

pub fn write_credentials(dir: &Path, k: &KeyPair) -> Result<()> {
    let text = format!(
        "access_key = {}\nsecret_key = {}\n",
        k.access_key, k.secret_key
    );
    write_durably(&dir.join("credentials"), text.as_bytes(), 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_format_is_upgraded_in_place() {
        let d = std::env::temp_dir().join(format!("cairn-dd-old-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join(FORMAT_FILE), "cairn-data 1\n").unwrap();
        prepare(&d).unwrap();
        assert_eq!(
            fs::read_to_string(d.join(FORMAT_FILE)).unwrap(),
            format!("cairn-data {DATA_DIR_FORMAT_VERSION}\n")
        );
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn the_node_id_is_chosen_once() {
        let d = tempfile::tempdir().unwrap();
        let id = node_id(d.path()).unwrap();
        assert_ne!(id, 0);
        assert_eq!(node_id(d.path()).unwrap(), id);
        fs::write(d.path().join(NODE_ID_FILE), "zz\n").unwrap();
        let err = node_id(d.path()).unwrap_err().to_string();
        assert!(err.contains("node id"), "{err}");
    }

    #[test]
    fn newer_format_is_refused() {
        let d = std::env::temp_dir().join(format!("cairn-dd-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        prepare(&d).unwrap();
        prepare(&d).unwrap();
        fs::write(
            d.join(FORMAT_FILE),
            format!("cairn-data {}\n", DATA_DIR_FORMAT_VERSION + 1),
        )
        .unwrap();
        let err = prepare(&d).unwrap_err().to_string();
        assert!(err.contains("newer than this cairn knows"), "{err}");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn credentials_round_trip_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let d = std::env::temp_dir().join(format!("cairn-cred-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        let k = generate_key_pair();
        assert_eq!(k.access_key.len(), 20);
        write_credentials(&d, &k).unwrap();
        let r = read_credentials(&d).unwrap().unwrap();
        assert_eq!((r.access_key, r.secret_key), (k.access_key, k.secret_key));
        let mode = fs::metadata(d.join("credentials"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let _ = fs::remove_dir_all(&d);
    }
}
