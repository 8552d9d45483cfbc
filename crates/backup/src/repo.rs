//! A target as a store of backups: its configuration (format, encrypted or
//! not), its chunks and its manifests.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::manifest::{
    self, Change, MANIFEST_FORMAT, MAX_PAGE_BYTES, Manifest, ObjectEntry, State, chunk_name,
    manifest_name, page_name,
};
use crate::pagebuf::{PageBuf, Pool};
use crate::target::{Target, blocking};
use crate::{BackupError, BackupKey, ChunkId, Codec};

/// The target's own file: its format, and whether (and with which key) its
/// files are encrypted.
pub const CONFIG_NAME: &str = "cairn-backup.json";
/// Format of a target this cairn writes and reads.
pub const TARGET_FORMAT: u32 = 1;
/// Bytes of an object per chunk (also one part of a multipart upload on
/// restore, so above S3's 5 MiB least part).
pub const CHUNK_SIZE: usize = 8 << 20;
/// Chunk buffers a target's pool keeps for reuse (more are made while
/// needed: a backup has about a dozen chunks in flight).
const BUFFERS_KEPT: usize = 12;

/// Objects smaller than this are cut into a buffer of their own size.
pub(crate) const SMALL_OBJECT: u64 = 1 << 20;
/// The largest chunk opened.
pub const MAX_CHUNK: usize = 64 << 20;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct TargetConfig {
    format: u32,
    encrypted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_check: Option<String>,
}

/// An opened target.
pub struct Repo<'a> {
    pub target: &'a dyn Target,
    pub codec: Codec,
    /// Buffers for chunks on their way to the target.
    buffers: Arc<Pool>,
}

impl<'a> Repo<'a> {
    /// Opens the backups at `target` with `key` (or none); with `create`, a
    /// target holding none yet is made one (encrypted if a key is given).
    pub async fn open(
        target: &'a dyn Target,
        key: Option<&BackupKey>,
        create: bool,
    ) -> Result<Repo<'a>, BackupError> {
        let cfg = match target.get(CONFIG_NAME).await? {
            Some(b) => serde_json::from_slice::<TargetConfig>(&b).map_err(|e| {
                BackupError::Corrupt(format!("{CONFIG_NAME} at {}: {e}", target.describe()))
            })?,
            None if create => {
                let cfg = TargetConfig {
                    format: TARGET_FORMAT,
                    encrypted: key.is_some(),
                    key_check: key.map(|k| k.check_value()),
                };
                let body = Bytes::from(serde_json::to_vec_pretty(&cfg).unwrap_or_default());
                if !target.put_new(CONFIG_NAME, body).await? {
                    // Made meanwhile by another run: open what it made.
                    return Box::pin(Repo::open(target, key, false)).await;
                }
                cfg
            }
            None => {
                return Err(BackupError::Target(format!(
                    "{} holds no backups (no {CONFIG_NAME})",
                    target.describe()
                )));
            }
        };
        if cfg.format > TARGET_FORMAT {
            return Err(BackupError::Format(format!(
                "the backups at {} are of format {} (this cairn reads format {TARGET_FORMAT})",
                target.describe(),
                cfg.format
            )));
        }
        let codec = match (cfg.encrypted, key) {
            (false, None) => Codec::plain(),
            (false, Some(_)) => {
                return Err(BackupError::Key(format!(
                    "the backups at {} are not encrypted: give no key",
                    target.describe()
                )));
            }
            (true, None) => {
                return Err(BackupError::Key(format!(
                    "the backups at {} are encrypted: give their key (--key-file FILE or CAIRN_BACKUP_KEY)",
                    target.describe()
                )));
            }
            (true, Some(k)) => {
                if cfg.key_check.as_deref() != Some(k.check_value().as_str()) {
                    return Err(BackupError::Key(format!(
                        "the key given is not the one the backups at {} were made with",
                        target.describe()
                    )));
                }
                Codec::encrypted(k)
            }
        };
        let buffers = Pool::new(codec.sealed_capacity(CHUNK_SIZE), BUFFERS_KEPT);
        Ok(Repo {
            target,
            codec,
            buffers,
        })
    }

    /// An empty chunk, filled by [`chunk_bytes`](Self::chunk_bytes) and
    /// stored by [`put_chunk`](Self::put_chunk).
    pub fn chunk_buffer(&self) -> Chunk {
        let mut buf = self.buffers.take();
        buf.set_len(self.codec.body_offset());
        Chunk {
            buf,
            hasher: self.codec.chunk_hasher(),
        }
    }

    /// An empty chunk for an object of `expected` bytes: a small object's
    /// buffer is of its own size, not a whole chunk's from the pool (it
    /// grows into one if the object turns out larger).
    pub fn chunk_buffer_for(&self, expected: u64) -> Chunk {
        if expected >= SMALL_OBJECT {
            return self.chunk_buffer();
        }
        let mut buf = PageBuf::new(self.codec.sealed_capacity(expected as usize));
        buf.set_len(self.codec.body_offset());
        Chunk {
            buf,
            hasher: self.codec.chunk_hasher(),
        }
    }

    /// Appends as much of `bytes` to a chunk as one chunk holds, hashing them
    /// while they are fresh in the cache; how many bytes that took, and
    /// whether the chunk is now full.
    pub fn chunk_bytes(&self, chunk: &mut Chunk, bytes: &[u8]) -> (usize, bool) {
        let at = self.codec.body_offset();
        let room = (at + CHUNK_SIZE).saturating_sub(chunk.buf.len());
        let want = bytes.len().min(room);
        let tag = self.codec.sealed_capacity(0) - at;
        if chunk.buf.len() + want + tag > chunk.buf.capacity() {
            // A small object's buffer, outgrown: its bytes move to a whole one.
            let mut whole = self.buffers.take();
            whole.fill(&chunk.buf);
            chunk.buf = whole;
        }
        let n = chunk.buf.fill(&bytes[..want]);
        chunk.hasher.update(&bytes[..n]);
        (n, chunk.buf.len() >= at + CHUNK_SIZE)
    }

    /// Stores a chunk unless the target has it; its name, its plain length,
    /// the size of its file there, and whether this call wrote it. Sealing
    /// runs off the reactor. The chunk's name is durable once the target
    /// syncs, which [`PageWriter::commit`] does before the manifest.
    pub async fn put_chunk(&self, chunk: Chunk) -> Result<(ChunkId, u64, u64, bool), BackupError> {
        let Chunk { buf, hasher } = chunk;
        let id = ChunkId(*hasher.finalize().as_bytes());
        let plain = buf.len().saturating_sub(self.codec.body_offset()) as u64;
        let name = chunk_name(&id);
        if let Some(n) = self.target.size_to_keep(&name).await? {
            return Ok((id, plain, n, false));
        }
        let codec = self.codec.clone();
        let sealed = blocking(move || codec.seal_in_place(buf)).await?;
        let n = sealed.len() as u64;
        // Durable from the target's next sync on, before the manifest.
        self.target.put_buf_deferred(&name, sealed).await?;
        Ok((id, plain, n, true))
    }

    /// A chunk's plain bytes, checked against its name (off the reactor).
    pub async fn get_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, BackupError> {
        let name = chunk_name(id);
        let sealed = self.get_bounded(&name, MAX_CHUNK).await?;
        let (codec, id) = (self.codec.clone(), *id);
        blocking(move || codec.open_chunk(&id, &sealed, MAX_CHUNK))
            .await
            .map_err(|e| named(&name, e))
    }

    /// Reads the sealed file `name` and decodes its plain bytes with `decode`
    /// (off the reactor); an error names the file.
    async fn open_file<T: Send + 'static>(
        &self,
        name: &str,
        decode: fn(&[u8]) -> Result<T, BackupError>,
    ) -> Result<T, BackupError> {
        let sealed = self.get_bounded(name, MAX_PAGE_BYTES).await?;
        let codec = self.codec.clone();
        blocking(move || decode(&codec.open(&sealed, MAX_PAGE_BYTES)?))
            .await
            .map_err(|e| named(name, e))
    }

    /// Seals `plain` (off the reactor) and writes it as `name`.
    async fn seal_file(&self, name: &str, plain: Vec<u8>) -> Result<(), BackupError> {
        let codec = self.codec.clone();
        let sealed = blocking(move || codec.seal(&plain)).await?;
        self.target.put_buf(name, sealed).await
    }

    /// A file's bytes, refused unread when it is missing or larger than a file
    /// holding `max` plain bytes can be (a damaged or foreign file is never
    /// read whole into memory).
    async fn get_bounded(&self, name: &str, max: usize) -> Result<Bytes, BackupError> {
        let limit = max as u64 + crate::codec::OVERHEAD as u64 + max as u64 / 64;
        match self.target.size(name).await? {
            None => return Err(BackupError::Corrupt(format!("{name}: missing"))),
            Some(n) if n > limit => {
                return Err(BackupError::Corrupt(format!(
                    "{name}: {n} bytes, more than such a file can hold"
                )));
            }
            Some(_) => {}
        }
        self.target
            .get(name)
            .await?
            .ok_or_else(|| BackupError::Corrupt(format!("{name}: missing")))
    }

    /// Every committed backup at the target, oldest first; a manifest that
    /// cannot be read is an error naming it.
    pub async fn manifests(&self) -> Result<Vec<Manifest>, BackupError> {
        let (good, mut bad) = self.manifests_checked().await?;
        match bad.pop() {
            Some(e) => Err(e),
            None => Ok(good),
        }
    }

    /// The manifests that can be read, oldest first, and an error for each
    /// that cannot (naming it).
    pub async fn manifests_checked(
        &self,
    ) -> Result<(Vec<Manifest>, Vec<BackupError>), BackupError> {
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        for (name, _) in self.target.list("backups/").await? {
            if !name.ends_with("/manifest") {
                continue;
            }
            match self.manifest_at(&name).await {
                Ok(m) => good.push(m),
                Err(e @ (BackupError::Corrupt(_) | BackupError::Format(_))) => bad.push(e),
                Err(e) => return Err(e),
            }
        }
        good.sort_by(|a, b| a.id.cmp(&b.id));
        Ok((good, bad))
    }

    async fn manifest_at(&self, name: &str) -> Result<Manifest, BackupError> {
        let m = self.open_file(name, Manifest::decode).await?;
        if manifest_name(&m.id) != name {
            return Err(BackupError::Corrupt(format!(
                "{name}: names backup {}",
                m.id
            )));
        }
        Ok(m)
    }

    /// A backup's changes since its parent, page after page.
    pub async fn changes(&self, m: &Manifest) -> Result<Vec<Change>, BackupError> {
        let mut out = Vec::new();
        for n in 0..m.pages {
            out.extend(self.page(m, n).await?);
        }
        Ok(out)
    }

    /// Page `n` of a backup's changes.
    pub async fn page(&self, m: &Manifest, n: u32) -> Result<Vec<Change>, BackupError> {
        self.open_file(&page_name(&m.id, n), manifest::decode_page)
            .await
    }

    /// The backups a restore of `id` reads, its full one first.
    pub fn chain<'m>(all: &'m [Manifest], id: &str) -> Result<Vec<&'m Manifest>, BackupError> {
        let by_id: HashMap<&str, &Manifest> = all.iter().map(|m| (m.id.as_str(), m)).collect();
        let mut chain = Vec::new();
        let mut at = Some(id);
        while let Some(i) = at {
            let m = by_id.get(i).ok_or_else(|| {
                BackupError::Corrupt(format!(
                    "backup {i} is missing (needed by {})",
                    chain.last().map_or(id, |m: &&Manifest| m.id.as_str())
                ))
            })?;
            if chain.len() > all.len() {
                return Err(BackupError::Corrupt(format!("the chain of {id} loops")));
            }
            chain.push(*m);
            at = m.parent.as_deref();
        }
        chain.reverse();
        if chain
            .first()
            .is_some_and(|m| m.kind != manifest::Kind::Full)
        {
            return Err(BackupError::Corrupt(format!(
                "the chain of {id} does not start with a full backup"
            )));
        }
        Ok(chain)
    }

    /// The objects as of backup `id`.
    pub async fn state_at(&self, all: &[Manifest], id: &str) -> Result<State, BackupError> {
        let mut state = State::new();
        for m in Repo::chain(all, id)? {
            manifest::apply(&mut state, self.changes(m).await?);
        }
        Ok(state)
    }

    /// The objects as of backup `id`, in (bucket, key) order, read as they
    /// are asked for: a chain of sorted backups is merged page by page (one
    /// page of each backup in memory); one holding an older, unsorted backup
    /// is read whole first.
    pub fn state_stream<'r>(
        &'r self,
        all: &'r [Manifest],
        id: &str,
    ) -> Result<StateStream<'r, 'a>, BackupError> {
        let chain = Repo::chain(all, id)?;
        let inner = if chain.iter().all(|m| m.sorted) {
            Inner::Merged(chain.into_iter().map(Cursor::new).collect())
        } else {
            Inner::Whole {
                id: id.to_string(),
                all,
                state: None,
            }
        };
        Ok(StateStream {
            repo: self,
            inner,
            ready: None,
        })
    }

    /// Writes a backup: its changes in pages, then its manifest (which commits it).
    #[cfg(test)]
    pub async fn commit(&self, m: Manifest, changes: &[Change]) -> Result<Manifest, BackupError> {
        let mut pages = PageWriter::new(self, &m.id);
        for c in changes {
            pages.push(c.clone()).await?;
        }
        pages.commit(m).await
    }
}

/// Writes a backup's pages of changes as they fill, then (commit) its
/// manifest: a backup of any size holds one page of changes in memory.
pub struct PageWriter<'r, 'a> {
    repo: &'r Repo<'a>,
    id: String,
    pages: u32,
    pending: Vec<Change>,
}

impl<'r, 'a> PageWriter<'r, 'a> {
    pub fn new(repo: &'r Repo<'a>, id: &str) -> PageWriter<'r, 'a> {
        PageWriter {
            repo,
            id: id.to_string(),
            pages: 0,
            pending: Vec::new(),
        }
    }

    /// Adds a change, writing a page when one is full.
    pub async fn push(&mut self, change: Change) -> Result<(), BackupError> {
        self.pending.push(change);
        if self.pending.len() >= manifest::PAGE_ENTRIES {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), BackupError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let page = manifest::encode_page(&self.pending);
        self.repo
            .seal_file(&page_name(&self.id, self.pages), page)
            .await?;
        self.pages += 1;
        self.pending.clear();
        Ok(())
    }

    /// Writes the last page, then the manifest `m` (whose id must be the
    /// writer's): from then on the backup exists.
    pub async fn commit(mut self, mut m: Manifest) -> Result<Manifest, BackupError> {
        if m.id != self.id {
            return Err(BackupError::Usage(format!(
                "pages written for backup {} cannot commit backup {}",
                self.id, m.id
            )));
        }
        self.flush().await?;
        // Every chunk the backup names is durable before its manifest is.
        self.repo.target.sync().await?;
        m.format = MANIFEST_FORMAT;
        m.pages = self.pages;
        self.repo
            .seal_file(&manifest_name(&m.id), m.encode())
            .await?;
        Ok(m)
    }
}

/// A chunk being cut from an object: its bytes in a buffer with room for
/// sealing in place, and the hash of those bytes so far (its name, once full).
pub struct Chunk {
    buf: PageBuf,
    hasher: blake3::Hasher,
}

impl Chunk {
    /// The plain bytes it holds.
    pub fn len(&self, codec: &Codec) -> usize {
        self.buf.len().saturating_sub(codec.body_offset())
    }
}

/// The objects as of one backup, in (bucket, key) order
/// ([`Repo::state_stream`]).
pub struct StateStream<'r, 'a> {
    repo: &'r Repo<'a>,
    inner: Inner<'r>,
    /// The next object, once peeked at.
    ready: Option<ObjectEntry>,
}

enum Inner<'r> {
    /// Each backup of the chain, oldest first, a page at a time.
    Merged(Vec<Cursor<'r>>),
    /// The state read whole (a chain with an unsorted backup), once asked.
    Whole {
        id: String,
        all: &'r [Manifest],
        state: Option<std::collections::btree_map::IntoValues<(String, String), ObjectEntry>>,
    },
}

/// Where a merge is in one backup's changes.
struct Cursor<'r> {
    m: &'r Manifest,
    next_page: u32,
    page: std::collections::VecDeque<Change>,
    /// The key of the last change taken, to check the order.
    last: Option<(String, String)>,
}

impl<'r> Cursor<'r> {
    fn new(m: &'r Manifest) -> Cursor<'r> {
        Cursor {
            m,
            next_page: 0,
            page: Default::default(),
            last: None,
        }
    }

    /// The key of the next change, reading the next page when needed.
    async fn head(&mut self, repo: &Repo<'_>) -> Result<Option<(&str, &str)>, BackupError> {
        while self.page.is_empty() && self.next_page < self.m.pages {
            self.page = repo.page(self.m, self.next_page).await?.into();
            self.next_page += 1;
        }
        let Some(c) = self.page.front() else {
            return Ok(None);
        };
        let k = change_key(c);
        if self
            .last
            .as_ref()
            .is_some_and(|l| (l.0.as_str(), l.1.as_str()) >= k)
        {
            return Err(BackupError::Corrupt(format!(
                "backup {}: its changes are out of order at {}/{}",
                self.m.id, k.0, k.1
            )));
        }
        Ok(Some(k))
    }

    fn take(&mut self) -> Option<Change> {
        let c = self.page.pop_front()?;
        let (b, k) = change_key(&c);
        self.last = Some((b.to_string(), k.to_string()));
        Some(c)
    }
}

fn change_key(c: &Change) -> (&str, &str) {
    match c {
        Change::Put(o) => (&o.bucket, &o.key),
        Change::Delete { bucket, key } => (bucket, key),
    }
}

impl StateStream<'_, '_> {
    /// The next object, without taking it.
    pub async fn peek(&mut self) -> Result<Option<&ObjectEntry>, BackupError> {
        if self.ready.is_none() {
            self.ready = self.read().await?;
        }
        Ok(self.ready.as_ref())
    }

    /// Takes the next object.
    pub async fn next(&mut self) -> Result<Option<ObjectEntry>, BackupError> {
        match self.ready.take() {
            Some(o) => Ok(Some(o)),
            None => self.read().await,
        }
    }

    async fn read(&mut self) -> Result<Option<ObjectEntry>, BackupError> {
        let repo = self.repo;
        match &mut self.inner {
            Inner::Whole { id, all, state } => {
                if state.is_none() {
                    *state = Some(repo.state_at(all, id).await?.into_values());
                }
                Ok(state.as_mut().and_then(Iterator::next))
            }
            Inner::Merged(cursors) => loop {
                // The least key at the head of any backup; the newest
                // backup's change to it is the one that counts.
                let mut least: Option<(String, String)> = None;
                for c in cursors.iter_mut() {
                    if let Some(k) = c.head(repo).await?
                        && least
                            .as_ref()
                            .is_none_or(|l| k < (l.0.as_str(), l.1.as_str()))
                    {
                        least = Some((k.0.to_string(), k.1.to_string()));
                    }
                }
                let Some(least) = least else {
                    return Ok(None);
                };
                let mut last = None;
                for c in cursors.iter_mut() {
                    if c.head(repo).await? == Some((least.0.as_str(), least.1.as_str())) {
                        last = c.take();
                    }
                }
                if let Some(Change::Put(o)) = last {
                    return Ok(Some(o));
                }
            },
        }
    }
}

/// An error about the file `name` at a target.
pub(crate) fn named(name: &str, e: BackupError) -> BackupError {
    match e {
        BackupError::Corrupt(why) => BackupError::Corrupt(format!("{name}: {why}")),
        BackupError::Format(why) => BackupError::Format(format!("{name}: {why}")),
        other => other,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::manifest::{Kind, ObjectEntry};
    use crate::target::LocalTarget;
    use std::collections::BTreeMap;

    /// A manifest of bucket `b` (unsorted, as an older cairn wrote them).
    pub(crate) fn manifest(id: &str, kind: Kind, parent: Option<&str>) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            id: id.into(),
            kind,
            parent: parent.map(str::to_string),
            buckets: vec!["b".into()],
            time: "2026-11-24T10:00:00Z".into(),
            finished: "2026-11-24T10:00:01Z".into(),
            objects: 0,
            bytes: 0,
            bytes_stored: 0,
            bytes_new: 0,
            bucket_settings: BTreeMap::new(),
            pages: 0,
            sorted: false,
        }
    }

    #[tokio::test]
    async fn a_target_remembers_whether_and_with_what_it_is_encrypted() {
        let dir = tempfile::tempdir().unwrap();
        let t = LocalTarget::new(dir.path());
        assert!(Repo::open(&t, None, false).await.is_err());
        let key = BackupKey::generate();
        Repo::open(&t, Some(&key), true).await.unwrap();
        Repo::open(&t, Some(&key), false).await.unwrap();
        let no_key = Repo::open(&t, None, false).await.err().unwrap();
        assert!(no_key.to_string().contains("encrypted"), "{no_key}");
        let wrong = Repo::open(&t, Some(&BackupKey::generate()), true)
            .await
            .err()
            .unwrap();
        assert!(wrong.to_string().contains("not the one"), "{wrong}");
        // A target of a newer format is refused.
        t.put(
            CONFIG_NAME,
            Bytes::from_static(br#"{"format":9,"encrypted":false}"#),
        )
        .await
        .unwrap();
        assert!(matches!(
            Repo::open(&t, None, false).await,
            Err(BackupError::Format(_))
        ));
    }

    /// Changes are written a page at a time as they come, and read back in
    /// their order; the manifest, written last, counts the pages.
    #[tokio::test]
    async fn changes_fill_pages_as_they_come() {
        let dir = tempfile::tempdir().unwrap();
        let t = LocalTarget::new(dir.path());
        let repo = Repo::open(&t, None, true).await.unwrap();
        let n = 2 * manifest::PAGE_ENTRIES + 7;
        let change = |i: usize| Change::Delete {
            bucket: "b".into(),
            key: format!("{i:06}"),
        };
        let mut pages = PageWriter::new(&repo, "1");
        for i in 0..n {
            pages.push(change(i)).await.unwrap();
        }
        // Full pages are at the target before the backup is committed; the
        // backup is not there yet.
        assert_eq!(t.list("backups/").await.unwrap().len(), 2);
        assert!(repo.manifests().await.unwrap().is_empty());
        // Another backup's manifest is refused by this writer.
        let other = PageWriter::new(&repo, "2");
        assert!(other.commit(manifest("1", Kind::Full, None)).await.is_err());
        let m = pages.commit(manifest("1", Kind::Full, None)).await.unwrap();
        assert_eq!(m.pages, 3);
        assert_eq!(repo.manifests().await.unwrap(), vec![m.clone()]);
        let back = repo.changes(&m).await.unwrap();
        assert_eq!(back, (0..n).map(change).collect::<Vec<_>>());
    }

    /// The changes that take `old` to `new` in (bucket, key) order, as a
    /// backup writes them.
    fn sorted_diff(old: &State, new: &State) -> Vec<Change> {
        let keys: std::collections::BTreeSet<_> = old.keys().chain(new.keys()).collect();
        keys.into_iter()
            .filter_map(|k| match (old.get(k), new.get(k)) {
                (_, Some(n)) if old.get(k) != Some(n) => Some(Change::Put(n.clone())),
                (Some(_), None) => Some(Change::Delete {
                    bucket: k.0.clone(),
                    key: k.1.clone(),
                }),
                _ => None,
            })
            .collect()
    }

    /// An object without chunks, its size and ETag telling its `version`.
    pub(crate) fn entry(bucket: &str, key: &str, version: u64) -> ObjectEntry {
        ObjectEntry {
            bucket: bucket.into(),
            key: key.into(),
            size: version,
            etag: format!("e{version}"),
            content_type: None,
            metadata: BTreeMap::new(),
            modified: "2026-11-24T10:00:00Z".into(),
            chunks: vec![],
            sealed: vec![],
        }
    }

    async fn streamed(
        repo: &Repo<'_>,
        all: &[Manifest],
        id: &str,
    ) -> Result<Vec<ObjectEntry>, BackupError> {
        let mut s = repo.state_stream(all, id)?;
        let mut out = Vec::new();
        while let Some(e) = s.next().await? {
            out.push(e);
        }
        Ok(out)
    }

    /// Full, incrementals, a differential and incrementals after it, each of
    /// more than one page, over three buckets: the merged stream of each
    /// chain is exactly the state the chain adds up to.
    #[tokio::test]
    async fn a_chain_of_sorted_backups_streams_the_state_it_adds_up_to() {
        let dir = tempfile::tempdir().unwrap();
        let t = LocalTarget::new(dir.path());
        let repo = Repo::open(&t, None, true).await.unwrap();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut random = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut states: Vec<State> = Vec::new();
        for step in 0..6u64 {
            let mut s = State::new();
            for b in ["a", "b", "c"] {
                for k in 0..9000 {
                    let r = random();
                    if r % 3 != 0 {
                        let key = format!("k{k:05}");
                        let version = if r % 5 == 0 { step } else { 0 };
                        s.insert((b.into(), key.clone()), entry(b, &key, version));
                    }
                }
            }
            let (kind, parent, base) = match step {
                0 => (Kind::Full, None, State::new()),
                3 => (Kind::Differential, Some("0".to_string()), states[0].clone()),
                _ => (
                    Kind::Incremental,
                    Some((step - 1).to_string()),
                    states[step as usize - 1].clone(),
                ),
            };
            let m = Manifest {
                sorted: true,
                ..manifest(&step.to_string(), kind, parent.as_deref())
            };
            let m = repo.commit(m, &sorted_diff(&base, &s)).await.unwrap();
            assert!(m.pages > 1, "backup {step}: {} pages", m.pages);
            states.push(s);
        }
        let all = repo.manifests().await.unwrap();
        for (i, want) in states.iter().enumerate() {
            let got = streamed(&repo, &all, &i.to_string()).await.unwrap();
            assert!(
                got == want.values().cloned().collect::<Vec<_>>(),
                "backup {i}"
            );
        }
    }

    /// A sorted backup whose changes are out of order is named as damaged;
    /// one of an older cairn (unsorted) is read whole and streams in order.
    #[tokio::test]
    async fn unsorted_changes_are_read_whole_or_named_as_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let t = LocalTarget::new(dir.path());
        let repo = Repo::open(&t, None, true).await.unwrap();
        let changes = [
            Change::Put(entry("b", "k2", 1)),
            Change::Put(entry("b", "k1", 1)),
        ];
        repo.commit(manifest("1", Kind::Full, None), &changes)
            .await
            .unwrap();
        let sorted = Manifest {
            sorted: true,
            ..manifest("2", Kind::Full, None)
        };
        repo.commit(sorted, &changes).await.unwrap();
        let all = repo.manifests().await.unwrap();
        let keys: Vec<String> = streamed(&repo, &all, "1")
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.key)
            .collect();
        assert_eq!(keys, ["k1", "k2"]);
        let err = streamed(&repo, &all, "2").await.err().unwrap();
        assert!(
            matches!(&err, BackupError::Corrupt(m) if m.contains("out of order")),
            "{err}"
        );
    }

    /// A small object's chunk buffer, given more bytes than the object was
    /// said to have, grows into a whole chunk's: the chunks cut and their
    /// names are those of a whole buffer; the stored chunk reads back.
    #[tokio::test]
    async fn a_small_buffer_outgrown_cuts_the_same_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let t = LocalTarget::new(dir.path());
        let repo = Repo::open(&t, None, true).await.unwrap();
        let data: Vec<u8> = (0..CHUNK_SIZE + 5000).map(|i| (i % 253) as u8).collect();
        let cut = |mut chunk: Chunk| {
            let mut rest = &data[..];
            let mut chunks = Vec::new();
            while !rest.is_empty() {
                let (took, full) = repo.chunk_bytes(&mut chunk, &rest[..rest.len().min(70_000)]);
                rest = &rest[took..];
                if full {
                    chunks.push(std::mem::replace(&mut chunk, repo.chunk_buffer_for(10)));
                }
            }
            chunks.push(chunk);
            chunks
        };
        let small = cut(repo.chunk_buffer_for(10));
        let whole = cut(repo.chunk_buffer());
        let lens = |c: &[Chunk]| c.iter().map(|c| c.len(&repo.codec)).collect::<Vec<_>>();
        assert_eq!(lens(&small), [CHUNK_SIZE, 5000]);
        assert_eq!(lens(&small), lens(&whole));
        let mut ids = Vec::new();
        for c in small.into_iter().chain(whole) {
            let (id, len, _, _) = repo.put_chunk(c).await.unwrap();
            ids.push((id, len));
        }
        assert_eq!(ids[..2], ids[2..]);
        assert_eq!(
            repo.get_chunk(&ids[0].0).await.unwrap(),
            &data[..CHUNK_SIZE]
        );
        assert_eq!(
            repo.get_chunk(&ids[1].0).await.unwrap(),
            &data[CHUNK_SIZE..]
        );
    }

    #[tokio::test]
    async fn chunks_are_stored_once_and_backups_chain_to_their_state() {
        let dir = tempfile::tempdir().unwrap();
        let t = LocalTarget::new(dir.path());
        let repo = Repo::open(&t, None, true).await.unwrap();
        let chunk = || {
            let mut b = repo.chunk_buffer();
            assert_eq!(repo.chunk_bytes(&mut b, b"some bytes"), (10, false));
            b
        };
        let (id, len, n, new) = repo.put_chunk(chunk()).await.unwrap();
        assert!(n > 0 && new && len == 10);
        assert_eq!(repo.put_chunk(chunk()).await.unwrap(), (id, 10, n, false));
        assert_eq!(repo.get_chunk(&id).await.unwrap(), b"some bytes");
        let obj = |key: &str| ObjectEntry {
            size: 10,
            chunks: vec![id],
            sealed: vec![n],
            ..entry("b", key, 0)
        };
        let full = repo
            .commit(
                manifest("1", Kind::Full, None),
                &[Change::Put(obj("x")), Change::Put(obj("y"))],
            )
            .await
            .unwrap();
        let del = Change::Delete {
            bucket: "b".into(),
            key: "x".into(),
        };
        repo.commit(manifest("2", Kind::Incremental, Some("1")), &[del])
            .await
            .unwrap();
        // A backup cut short (pages, no manifest) is not listed.
        t.put(&page_name("3", 0), Bytes::from_static(b"x"))
            .await
            .unwrap();
        let all = repo.manifests().await.unwrap();
        assert_eq!(
            all.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
            ["1", "2"]
        );
        assert_eq!(all[0], full);
        let keys = |s: State| s.into_keys().map(|k| k.1).collect::<Vec<_>>();
        assert_eq!(keys(repo.state_at(&all, "1").await.unwrap()), ["x", "y"]);
        assert_eq!(keys(repo.state_at(&all, "2").await.unwrap()), ["y"]);
        // A damaged page is named.
        t.put(&page_name("1", 0), Bytes::from_static(b"garbage"))
            .await
            .unwrap();
        let err = repo.state_at(&all, "2").await.err().unwrap().to_string();
        assert!(err.contains("backups/1/page-000000"), "{err}");
        // A file far larger than a chunk can be is refused unread.
        let huge = ChunkId([7; 32]);
        let path = dir.path().join(chunk_name(&huge));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::File::create(&path)
            .unwrap()
            .set_len(MAX_CHUNK as u64 * 2)
            .unwrap();
        let err = repo.get_chunk(&huge).await.err().unwrap().to_string();
        assert!(err.contains("more than such a file can hold"), "{err}");
        // A chain whose parent is gone is refused, naming it.
        let orphan = [manifest("5", Kind::Incremental, Some("4"))];
        let err = Repo::chain(&orphan, "5").err().unwrap().to_string();
        assert!(err.contains("backup 4 is missing"), "{err}");
    }
}
