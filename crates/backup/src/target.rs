//! Where backups are kept: a local folder, or a bucket and prefix on any S3
//! endpoint. Both are stores of named files ('/'-separated relative names);
//! a file is written whole or not at all.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;

use crate::BackupError;
use crate::pagebuf::PageBuf;

/// A file store that backups are written to.
#[async_trait]
pub trait Target: Send + Sync {
    /// Where it is, for messages.
    fn describe(&self) -> String;
    /// Writes a file whole (replacing one of that name), durably.
    async fn put(&self, name: &str, data: Bytes) -> Result<(), BackupError>;
    /// Writes a file whole from a page-aligned buffer, durably (a local
    /// folder writes it with direct I/O, past the page cache).
    async fn put_buf(&self, name: &str, data: PageBuf) -> Result<(), BackupError> {
        self.put(name, Bytes::from_owner(data)).await
    }
    /// As [`Target::put_buf`], but the new name may be durable only from the
    /// next [`Target::sync`] on (a local folder fsyncs the file at once and
    /// its folder then: one folder fsync for many files).
    async fn put_buf_deferred(&self, name: &str, data: PageBuf) -> Result<(), BackupError> {
        self.put_buf(name, data).await
    }
    /// As [`Target::size`], for a file about to be referred to: if it is
    /// there, its name is durable from the next [`Target::sync`] on (it may
    /// have been written by a run killed before its own sync).
    async fn size_to_keep(&self, name: &str) -> Result<Option<u64>, BackupError> {
        self.size(name).await
    }
    /// Makes durable the names written by [`Target::put_buf_deferred`] and
    /// found by [`Target::size_to_keep`] since the last sync.
    async fn sync(&self) -> Result<(), BackupError> {
        Ok(())
    }
    /// Writes a file only if none of that name exists; whether it did.
    async fn put_new(&self, name: &str, data: Bytes) -> Result<bool, BackupError>;
    /// A file's bytes, or `None` if there is none.
    async fn get(&self, name: &str) -> Result<Option<Bytes>, BackupError>;
    /// A file's size, or `None` if there is none.
    async fn size(&self, name: &str) -> Result<Option<u64>, BackupError>;
    /// Every file whose name starts with `prefix` (a folder, ending in '/'),
    /// with its size, in name order.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, BackupError>;
    /// Removes a file (none is no error).
    async fn delete(&self, name: &str) -> Result<(), BackupError>;
    /// Removes what writes cut short left behind (temporary files); called
    /// only with the target's lock held, when no write is under way. How many.
    async fn sweep_temporary(&self) -> Result<u64, BackupError> {
        Ok(0)
    }
}

/// Refuses names that could leave the target: absolute, empty parts, `.`, `..`.
pub(crate) fn check_name(name: &str) -> Result<(), BackupError> {
    let ok = !name.is_empty()
        && !name.starts_with('/')
        && name
            .split('/')
            .all(|p| !p.is_empty() && p != "." && p != ".." && !p.contains('\\'));
    if ok {
        Ok(())
    } else {
        Err(BackupError::Target(format!(
            "'{name}' is not a file name in a target"
        )))
    }
}

/// A folder on this machine.
pub struct LocalTarget {
    root: PathBuf,
    /// Folders holding names not yet made durable (see [`Target::sync`]).
    unsynced: Arc<Mutex<BTreeSet<PathBuf>>>,
}

impl LocalTarget {
    /// The folder `root` (made if missing when first written).
    pub fn new(root: impl Into<PathBuf>) -> LocalTarget {
        LocalTarget {
            root: root.into(),
            unsynced: Arc::default(),
        }
    }

    /// Notes that `path`'s name is to be made durable by the next sync.
    fn sync_later(unsynced: &Mutex<BTreeSet<PathBuf>>, path: &Path) {
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        unsynced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(dir);
    }

    fn path(&self, name: &str) -> Result<PathBuf, BackupError> {
        check_name(name)?;
        Ok(self.root.join(name))
    }
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> BackupError {
    BackupError::Target(format!("{what} {}: {e}", path.display()))
}

/// Writes `data` to a new temporary file beside `path`, fsynced; its path.
fn write_temp(path: &Path, data: &[u8]) -> Result<PathBuf, BackupError> {
    let tmp = temp_beside(path)?;
    let res = (|| {
        let mut f = std::fs::File::create_new(&tmp)?;
        f.write_all(data)?;
        f.sync_all()
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err("writing", &tmp, e));
    }
    Ok(tmp)
}

/// A new temporary file's name beside `path` (its folder made if missing).
fn temp_beside(path: &Path) -> Result<PathBuf, BackupError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| io_err("making", dir, e))?;
    Ok(dir.join(format!(
        ".{}.{:016x}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        rand::random::<u64>()
    )))
}

/// As [`write_temp`], from a page-aligned buffer written with direct I/O:
/// the bytes go from the buffer to the disk, not through a copy in the page
/// cache (the costliest part of a large write). The whole pages are written
/// and the file cut to its length. Where the file system refuses direct I/O
/// (tmpfs, say), and for files under [`DIRECT_MIN`], the bytes are written as
/// usual.
fn write_temp_direct(path: &Path, data: &mut PageBuf) -> Result<PathBuf, BackupError> {
    use std::os::unix::fs::OpenOptionsExt;
    if data.len() < DIRECT_MIN {
        return write_temp(path, data);
    }
    let tmp = temp_beside(path)?;
    let direct = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(&tmp);
    let Ok(mut f) = direct else {
        // Some file systems make the file before refusing the flag.
        let _ = std::fs::remove_file(&tmp);
        return write_temp(path, data);
    };
    let len = data.len() as u64;
    let res = f
        .write_all(data.padded())
        .and_then(|()| f.set_len(len))
        .and_then(|()| f.sync_all());
    match res {
        Ok(()) => Ok(tmp),
        // Refused for this device's alignment: written as usual instead.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let _ = std::fs::remove_file(&tmp);
            write_temp(path, data)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(io_err("writing", &tmp, e))
        }
    }
}

/// Files smaller than this are written through the page cache: for them,
/// direct I/O saves no copy worth its extra step (cutting the padding).
const DIRECT_MIN: usize = 64 << 10;

/// Writes `data` as `path` (see [`write_temp_direct`]): the file fsynced and
/// renamed, its folder not yet synced.
fn write_direct(path: &Path, mut data: PageBuf) -> Result<(), BackupError> {
    let tmp = write_temp_direct(path, &mut data)?;
    drop(data); // back to its pool before the rename
    rename(&tmp, path)
}

/// Renames the written file `tmp` to `path`, durably.
fn rename_durably(tmp: &Path, path: &Path) -> Result<(), BackupError> {
    rename(tmp, path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Renames the written file `tmp` to `path` (removing `tmp` if that fails).
fn rename(tmp: &Path, path: &Path) -> Result<(), BackupError> {
    std::fs::rename(tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(tmp);
        io_err("renaming into", path, e)
    })
}

/// Makes a rename or a new link in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), BackupError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("syncing", dir, e))
}

/// Runs file I/O or CPU-heavy work (hashing, compression, ciphers, decoding)
/// on a blocking thread, off the reactor.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BackupError> + Send + 'static,
) -> Result<T, BackupError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BackupError::Target(format!("a blocking task failed: {e}")))?
}

#[async_trait]
impl Target for LocalTarget {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    async fn put(&self, name: &str, data: Bytes) -> Result<(), BackupError> {
        let path = self.path(name)?;
        blocking(move || {
            let tmp = write_temp(&path, &data)?;
            rename_durably(&tmp, &path)
        })
        .await
    }

    async fn put_buf(&self, name: &str, data: PageBuf) -> Result<(), BackupError> {
        let path = self.path(name)?;
        blocking(move || {
            write_direct(&path, data)?;
            sync_dir(path.parent().unwrap_or(Path::new(".")))
        })
        .await
    }

    async fn put_buf_deferred(&self, name: &str, data: PageBuf) -> Result<(), BackupError> {
        let path = self.path(name)?;
        let unsynced = self.unsynced.clone();
        blocking(move || {
            write_direct(&path, data)?;
            Self::sync_later(&unsynced, &path);
            Ok(())
        })
        .await
    }

    async fn size_to_keep(&self, name: &str) -> Result<Option<u64>, BackupError> {
        let size = self.size(name).await?;
        if size.is_some() {
            Self::sync_later(&self.unsynced, &self.path(name)?);
        }
        Ok(size)
    }

    async fn sync(&self) -> Result<(), BackupError> {
        let dirs = std::mem::take(&mut *self.unsynced.lock().unwrap_or_else(|e| e.into_inner()));
        blocking(move || dirs.iter().try_for_each(|d| sync_dir(d))).await
    }

    async fn put_new(&self, name: &str, data: Bytes) -> Result<bool, BackupError> {
        let path = self.path(name)?;
        blocking(move || {
            let tmp = write_temp(&path, &data)?;
            // A link fails if the name exists: atomic, unlike a check then a rename.
            let linked = std::fs::hard_link(&tmp, &path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => {
                    sync_dir(path.parent().unwrap_or(Path::new(".")))?;
                    Ok(true)
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(io_err("linking", &path, e)),
            }
        })
        .await
    }

    async fn get(&self, name: &str) -> Result<Option<Bytes>, BackupError> {
        let path = self.path(name)?;
        blocking(move || match std::fs::read(&path) {
            Ok(b) => Ok(Some(Bytes::from(b))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("reading", &path, e)),
        })
        .await
    }

    async fn size(&self, name: &str) -> Result<Option<u64>, BackupError> {
        let path = self.path(name)?;
        blocking(move || match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("reading", &path, e)),
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, BackupError> {
        let dir = match prefix.strip_suffix('/') {
            Some(p) => self.path(p)?,
            None => {
                return Err(BackupError::Target(format!(
                    "'{prefix}' is not a folder name (it ends in '/')"
                )));
            }
        };
        let prefix = prefix.to_string();
        blocking(move || {
            let mut out = Vec::new();
            let mut stack = vec![(dir, prefix)];
            while let Some((d, p)) = stack.pop() {
                let rd = match std::fs::read_dir(&d) {
                    Ok(rd) => rd,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_err("listing", &d, e)),
                };
                for entry in rd {
                    let entry = entry.map_err(|e| io_err("listing", &d, e))?;
                    let Some(n) = entry.file_name().to_str().map(str::to_string) else {
                        continue;
                    };
                    // Temporary files of writes under way (or cut short).
                    if n.starts_with('.') {
                        continue;
                    }
                    let meta = entry
                        .metadata()
                        .map_err(|e| io_err("listing", &entry.path(), e))?;
                    if meta.is_dir() {
                        stack.push((entry.path(), format!("{p}{n}/")));
                    } else {
                        out.push((format!("{p}{n}"), meta.len()));
                    }
                }
            }
            out.sort();
            Ok(out)
        })
        .await
    }

    async fn delete(&self, name: &str) -> Result<(), BackupError> {
        let path = self.path(name)?;
        blocking(move || match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("removing", &path, e)),
        })
        .await
    }

    async fn sweep_temporary(&self) -> Result<u64, BackupError> {
        let root = self.root.clone();
        blocking(move || {
            let mut removed = 0;
            let mut stack = vec![root];
            while let Some(d) = stack.pop() {
                let rd = match std::fs::read_dir(&d) {
                    Ok(rd) => rd,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_err("listing", &d, e)),
                };
                for entry in rd {
                    let entry = entry.map_err(|e| io_err("listing", &d, e))?;
                    let name = entry.file_name();
                    let name = name.to_string_lossy();
                    let kind = entry
                        .file_type()
                        .map_err(|e| io_err("listing", &entry.path(), e))?;
                    if kind.is_dir() {
                        stack.push(entry.path());
                    } else if name.starts_with('.') && name.ends_with(".tmp") {
                        std::fs::remove_file(entry.path())
                            .map_err(|e| io_err("removing", &entry.path(), e))?;
                        removed += 1;
                    }
                }
            }
            Ok(removed)
        })
        .await
    }
}

/// A bucket and a prefix on an S3 endpoint (another cairn, or any S3 store).
pub struct S3Target {
    client: aws_sdk_s3::Client,
    endpoint: String,
    bucket: String,
    /// Empty, or ending in '/'.
    prefix: String,
}

impl S3Target {
    /// `location` is `s3://bucket/prefix` (the prefix may be empty).
    pub fn new(
        location: &str,
        endpoint: &str,
        access_key: &str,
        secret_key: &str,
    ) -> Result<S3Target, BackupError> {
        let rest = location.strip_prefix("s3://").ok_or_else(|| {
            BackupError::Target(format!(
                "'{location}' is not an S3 location (s3://bucket/prefix)"
            ))
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(BackupError::Target(format!("'{location}' names no bucket")));
        }
        let prefix = prefix.trim_matches('/');
        if !prefix.is_empty() {
            check_name(prefix)?;
        }
        Ok(S3Target {
            client: s3_client(endpoint, access_key, secret_key),
            endpoint: endpoint.to_string(),
            bucket: bucket.to_string(),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
        })
    }

    fn key(&self, name: &str) -> Result<String, BackupError> {
        check_name(name)?;
        Ok(format!("{}{name}", self.prefix))
    }

    fn fail<E: std::fmt::Debug>(&self, what: &str, name: &str, e: E) -> BackupError {
        BackupError::Target(format!(
            "{what} s3://{}/{}{name} at {}: {}",
            self.bucket,
            self.prefix,
            self.endpoint,
            sdk_message(&e)
        ))
    }
}

/// An S3 client of `endpoint` (path-style addressing, which any S3 store takes).
pub(crate) fn s3_client(endpoint: &str, access_key: &str, secret_key: &str) -> aws_sdk_s3::Client {
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            access_key,
            secret_key,
            None,
            None,
            "cairn-backup",
        ))
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

/// The S3 error code and message of an SDK error, or its debug text.
pub(crate) fn sdk_message<E: std::fmt::Debug>(e: &E) -> String {
    let text = format!("{e:?}");
    let field = |name: &str| {
        let at = text.find(&format!("{name}: Some(\""))? + name.len() + 8;
        let end = text[at..].find('"')?;
        Some(text[at..at + end].to_string())
    };
    match (field("code"), field("message")) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c,
        _ if text.contains("DispatchFailure") => "the endpoint cannot be reached".to_string(),
        _ => text.chars().take(300).collect(),
    }
}

fn status_of<E>(e: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> u16 {
    e.raw_response().map(|r| r.status().as_u16()).unwrap_or(0)
}

#[async_trait]
impl Target for S3Target {
    fn describe(&self) -> String {
        format!("s3://{}/{} at {}", self.bucket, self.prefix, self.endpoint)
    }

    async fn put(&self, name: &str, data: Bytes) -> Result<(), BackupError> {
        let key = self.key(name)?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(data.into())
            .send()
            .await
            .map_err(|e| self.fail("writing", name, e))?;
        Ok(())
    }

    async fn put_new(&self, name: &str, data: Bytes) -> Result<bool, BackupError> {
        let key = self.key(name)?;
        match self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .if_none_match("*")
            .body(data.into())
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if status_of(&e) == 412 => Ok(false),
            Err(e) => Err(self.fail("writing", name, e)),
        }
    }

    async fn get(&self, name: &str) -> Result<Option<Bytes>, BackupError> {
        let key = self.key(name)?;
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(resp) => {
                let body = resp
                    .body
                    .collect()
                    .await
                    .map_err(|e| self.fail("reading", name, e))?;
                Ok(Some(body.into_bytes()))
            }
            Err(e) if status_of(&e) == 404 => Ok(None),
            Err(e) => Err(self.fail("reading", name, e)),
        }
    }

    async fn size(&self, name: &str) -> Result<Option<u64>, BackupError> {
        let key = self.key(name)?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(resp) => Ok(Some(resp.content_length().unwrap_or(0).max(0) as u64)),
            Err(e) if status_of(&e) == 404 => Ok(None),
            Err(e) => Err(self.fail("looking at", name, e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, BackupError> {
        if !prefix.ends_with('/') {
            return Err(BackupError::Target(format!(
                "'{prefix}' is not a folder name (it ends in '/')"
            )));
        }
        check_name(prefix.trim_end_matches('/'))?;
        let full = format!("{}{prefix}", self.prefix);
        let mut out = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.fail("listing", prefix, e))?;
            for o in page.contents() {
                if let Some(k) = o.key()
                    && let Some(name) = k.strip_prefix(&self.prefix)
                {
                    out.push((name.to_string(), o.size().unwrap_or(0).max(0) as u64));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    async fn delete(&self, name: &str) -> Result<(), BackupError> {
        let key = self.key(name)?;
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.fail("removing", name, e))?;
        Ok(())
    }
}

/// The target a command names: `s3://bucket/prefix` (with an endpoint and
/// keys), or a folder (`file:///path` or a plain path).
pub fn open(
    location: &str,
    s3: Option<(&str, &str, &str)>,
) -> Result<Box<dyn Target>, BackupError> {
    if location.starts_with("s3://") {
        let Some((endpoint, ak, sk)) = s3 else {
            return Err(BackupError::Target(format!(
                "{location} needs --target-endpoint and keys (--target-access-key and \
                 --target-secret-key, or CAIRN_TARGET_ACCESS_KEY and CAIRN_TARGET_SECRET_KEY)"
            )));
        };
        return Ok(Box::new(S3Target::new(location, endpoint, ak, sk)?));
    }
    let path = location.strip_prefix("file://").unwrap_or(location);
    if path.is_empty() || location.contains("://") && !location.starts_with("file://") {
        return Err(BackupError::Target(format!(
            "'{location}' is not a backup target (a folder, file:///path, or s3://bucket/prefix)"
        )));
    }
    Ok(Box::new(LocalTarget::new(path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct I/O writes whole pages and cuts the file to its length; where
    /// the file system refuses it (tmpfs, say) the bytes are written as usual.
    #[tokio::test]
    async fn aligned_buffers_are_written_exactly_with_or_without_direct_io() {
        let disk = tempfile::tempdir().unwrap();
        let mut roots = vec![disk.path().to_path_buf()];
        let shm = std::path::Path::new("/dev/shm");
        let mem = shm
            .is_dir()
            .then(|| tempfile::tempdir_in(shm).ok())
            .flatten();
        roots.extend(mem.as_ref().map(|d| d.path().to_path_buf()));
        for root in roots {
            let t = LocalTarget::new(root.join("t"));
            for len in [0, 1, 4095, 4096, 4097, (8 << 20) + 56] {
                let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
                let mut buf = crate::pagebuf::PageBuf::new(len + 4096);
                buf.spare_mut().fill(0xee); // stale bytes are never written
                assert_eq!(buf.fill(&data), len);
                let name = format!("c/{len}");
                t.put_buf(&name, buf).await.unwrap();
                assert_eq!(t.size(&name).await.unwrap(), Some(len as u64));
                assert_eq!(t.get(&name).await.unwrap().unwrap(), &data[..]);
            }
            let left: Vec<_> = std::fs::read_dir(root.join("t/c"))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| n.starts_with('.'))
                .collect();
            assert!(left.is_empty(), "temporary files left: {left:?}");
        }
    }

    #[tokio::test]
    async fn a_local_target_keeps_what_is_put() {
        let dir = tempfile::tempdir().unwrap();
        let t = LocalTarget::new(dir.path().join("t"));
        assert_eq!(t.get("a/b").await.unwrap(), None);
        assert_eq!(t.list("a/").await.unwrap(), vec![]);
        t.put("a/b", Bytes::from_static(b"one")).await.unwrap();
        t.put("a/b", Bytes::from_static(b"two")).await.unwrap();
        t.put("a/c/d", Bytes::from_static(b"three")).await.unwrap();
        t.put("e", Bytes::from_static(b"")).await.unwrap();
        assert_eq!(t.get("a/b").await.unwrap().unwrap(), &b"two"[..]);
        assert_eq!(t.size("a/c/d").await.unwrap(), Some(5));
        assert_eq!(t.size("a/c").await.unwrap(), None);
        assert_eq!(
            t.list("a/").await.unwrap(),
            vec![("a/b".to_string(), 3), ("a/c/d".to_string(), 5)]
        );
        assert!(
            t.put_new("a/b", Bytes::from_static(b"x"))
                .await
                .is_ok_and(|new| !new)
        );
        assert!(t.put_new("a/n", Bytes::from_static(b"x")).await.unwrap());
        t.delete("a/b").await.unwrap();
        t.delete("a/b").await.unwrap();
        assert_eq!(t.get("a/b").await.unwrap(), None);
        // No temporary file is left behind.
        let names: Vec<String> = t
            .list("a/")
            .await
            .unwrap()
            .into_iter()
            .map(|x| x.0)
            .collect();
        assert_eq!(names, ["a/c/d", "a/n"]);
        // What a write cut short leaves is swept (and only that).
        std::fs::write(dir.path().join("t/a/c/.d.0123.tmp"), b"half").unwrap();
        assert_eq!(t.sweep_temporary().await.unwrap(), 1);
        assert!(t.get("a/c/d").await.unwrap().is_some());
        assert_eq!(
            std::fs::read_dir(dir.path().join("t/a")).unwrap().count(),
            2
        );
    }

    #[tokio::test]
    async fn names_that_leave_the_target_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let t = LocalTarget::new(dir.path());
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "a\\b",
        ] {
            assert!(t.put(bad, Bytes::new()).await.is_err(), "{bad}");
            assert!(t.get(bad).await.is_err(), "{bad}");
        }
        assert!(t.list("a").await.is_err());
    }

    #[test]
    fn locations_name_their_kind_of_target() {
        assert!(open("/tmp/x", None).unwrap().describe().ends_with("/tmp/x"));
        assert!(
            open("file:///tmp/x", None)
                .unwrap()
                .describe()
                .ends_with("/tmp/x")
        );
        assert!(open("s3://b/p", None).is_err());
        assert!(open("http://x/y", None).is_err());
        assert!(open("", None).is_err());
        let t = open("s3://b/p/q/", Some(("http://127.0.0.1:1", "a", "s"))).unwrap();
        assert_eq!(t.describe(), "s3://b/p/q/ at http://127.0.0.1:1");
        assert!(S3Target::new("s3:///p", "http://127.0.0.1:1", "a", "s").is_err());
        assert!(S3Target::new("s3://b/../p", "http://127.0.0.1:1", "a", "s").is_err());
    }

    /// Files written for a later sync are whole at once (with or without
    /// direct I/O, by size); their folders, and those of files found present
    /// for keeping, are synced once each by the next sync, and only then.
    #[tokio::test]
    async fn deferred_names_are_synced_once_per_folder() {
        let dir = tempfile::tempdir().unwrap();
        let t = LocalTarget::new(dir.path().join("t"));
        let pending = |t: &LocalTarget| t.unsynced.lock().unwrap().clone();
        let bytes = |n: usize| (0..n).map(|i| (i * 31 % 251) as u8).collect::<Vec<u8>>();
        let buf = |n: usize| {
            let mut b = PageBuf::new(n);
            b.fill(&bytes(n));
            b
        };
        t.put("c/old", Bytes::from_static(b"kept")).await.unwrap();
        assert_eq!(t.size_to_keep("c/missing").await.unwrap(), None);
        assert!(pending(&t).is_empty(), "a missing file is nothing to keep");
        for (name, n) in [
            ("a/1", 100),
            ("a/2", DIRECT_MIN),
            ("b/3", DIRECT_MIN * 3 + 1),
        ] {
            t.put_buf_deferred(name, buf(n)).await.unwrap();
            let got = t.get(name).await.unwrap().unwrap();
            assert_eq!(got, bytes(n), "{name}");
        }
        assert_eq!(t.size_to_keep("c/old").await.unwrap(), Some(4));
        let root = dir.path().join("t");
        let want: BTreeSet<PathBuf> = ["a", "b", "c"].iter().map(|d| root.join(d)).collect();
        assert_eq!(pending(&t), want);
        t.sync().await.unwrap();
        assert!(pending(&t).is_empty());
        // Nothing left behind but the files themselves.
        let mut names = t.list("a/").await.unwrap();
        names.extend(t.list("b/").await.unwrap());
        let names: Vec<&str> = names.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a/1", "a/2", "b/3"]);
        assert_eq!(t.sweep_temporary().await.unwrap(), 0);
    }
}
