//! What a backup holds: its manifest (kind, parent, buckets, time, counts) and
//! its changes (objects put, objects deleted) since its parent, in pages.
//!
//! At the target, backup `ID` is the folder `backups/ID/`: pages `page-NNNNNN`
//! first, then `manifest`, written last: a backup whose manifest is missing
//! was cut short and does not exist. Every file is sealed (`codec`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{BackupError, ChunkId};

/// Format of manifests and pages this cairn writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;
/// Changes per page: a page stays a few MiB at most.
pub const PAGE_ENTRIES: usize = 10_000;
/// The largest page or manifest opened (plain bytes).
pub const MAX_PAGE_BYTES: usize = 256 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Every object of the buckets.
    Full,
    /// What changed since the last backup of the same buckets (any kind).
    Incremental,
    /// What changed since the last full backup of the same buckets.
    Differential,
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Kind, String> {
        match s {
            "full" => Ok(Kind::Full),
            "incremental" => Ok(Kind::Incremental),
            "differential" => Ok(Kind::Differential),
            _ => Err(format!(
                "'{s}' is not a backup type (full, incremental or differential)"
            )),
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Full => "full",
            Kind::Incremental => "incremental",
            Kind::Differential => "differential",
        })
    }
}

/// One object as the backup captured it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectEntry {
    pub bucket: String,
    pub key: String,
    pub size: u64,
    pub etag: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// User metadata (`x-amz-meta-*`, without the prefix).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// When the object was last written, as the source says (RFC 3339).
    pub modified: String,
    /// Its bytes, chunk after chunk.
    pub chunks: Vec<ChunkId>,
    /// The size of each chunk's file at the target (what verify checks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sealed: Vec<u64>,
}

/// A change since the parent backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Change {
    Put(ObjectEntry),
    Delete { bucket: String, key: String },
}

/// A backup's head, written after all its pages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: Kind,
    /// The backup this one's changes are counted from (none for a full one).
    pub parent: Option<String>,
    /// The buckets backed up, sorted.
    pub buckets: Vec<String>,
    /// Its point in time: when it began (RFC 3339).
    pub time: String,
    /// When it was committed (RFC 3339).
    pub finished: String,
    /// Objects in the buckets as of this backup.
    pub objects: u64,
    /// Bytes of those objects.
    pub bytes: u64,
    /// Bytes the chunks written by this backup take at the target.
    pub bytes_stored: u64,
    /// Bytes of objects read for this backup (new or changed).
    pub bytes_new: u64,
    /// Each bucket's own settings (as the admin API gives them).
    pub bucket_settings: BTreeMap<String, serde_json::Value>,
    /// Pages of changes: `page-000000` to this less one.
    pub pages: u32,
    /// Whether its pages list the changes in (bucket, key) order, one per
    /// object (so that chains can be merged page by page).
    #[serde(default)]
    pub sorted: bool,
}

impl Manifest {
    /// Decodes a manifest's plain bytes; one of a newer format is refused.
    pub fn decode(plain: &[u8]) -> Result<Manifest, BackupError> {
        #[derive(Deserialize)]
        struct Peek {
            format: u32,
        }
        let peek: Peek = serde_json::from_slice(plain)
            .map_err(|e| BackupError::Corrupt(format!("not a manifest: {e}")))?;
        if peek.format > MANIFEST_FORMAT {
            return Err(BackupError::Format(format!(
                "a manifest of format {} (this cairn reads up to {MANIFEST_FORMAT})",
                peek.format
            )));
        }
        serde_json::from_slice(plain)
            .map_err(|e| BackupError::Corrupt(format!("not a manifest: {e}")))
    }

    pub fn encode(&self) -> Vec<u8> {
        // A manifest is plain data: serialising it cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Name of a backup's manifest at the target.
pub fn manifest_name(id: &str) -> String {
    format!("backups/{id}/manifest")
}

/// Name of a backup's page `n` at the target.
pub fn page_name(id: &str, n: u32) -> String {
    format!("backups/{id}/page-{n:06}")
}

/// Name of a chunk at the target.
pub fn chunk_name(id: &ChunkId) -> String {
    let h = id.to_hex();
    format!("chunks/{}/{h}", &h[..2])
}

pub fn encode_page(changes: &[Change]) -> Vec<u8> {
    serde_json::to_vec(changes).unwrap_or_default()
}

pub fn decode_page(plain: &[u8]) -> Result<Vec<Change>, BackupError> {
    serde_json::from_slice(plain)
        .map_err(|e| BackupError::Corrupt(format!("not a page of changes: {e}")))
}

/// The state a chain of backups adds up to: each object by (bucket, key).
pub type State = BTreeMap<(String, String), ObjectEntry>;

/// Applies one backup's changes to the state its parent left.
pub fn apply(state: &mut State, changes: impl IntoIterator<Item = Change>) {
    for c in changes {
        match c {
            Change::Put(o) => {
                state.insert((o.bucket.clone(), o.key.clone()), o);
            }
            Change::Delete { bucket, key } => {
                state.remove(&(bucket, key));
            }
        }
    }
}

/// Whether the source's view of an object (size, ETag, time of writing) is
/// the one a backup holds: then its bytes are not read again.
pub fn unchanged(held: &ObjectEntry, size: u64, etag: &str, modified: &str) -> bool {
    held.size == size && held.etag == etag && held.modified == modified
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The changes that take `old` to `new`, as a backup makes them
    /// (`engine::backup_locked`): puts of objects new or changed, then deletes
    /// of objects gone.
    fn diff(old: &State, new: &State) -> Vec<Change> {
        let mut out = Vec::new();
        for (k, o) in new {
            if old.get(k) != Some(o) {
                out.push(Change::Put(o.clone()));
            }
        }
        for (bucket, key) in old.keys() {
            if !new.contains_key(&(bucket.clone(), key.clone())) {
                out.push(Change::Delete {
                    bucket: bucket.clone(),
                    key: key.clone(),
                });
            }
        }
        out
    }

    fn obj(bucket: &str, key: &str, etag: &str) -> ObjectEntry {
        ObjectEntry {
            bucket: bucket.into(),
            key: key.into(),
            size: 3,
            etag: etag.into(),
            content_type: Some("text/plain".into()),
            metadata: BTreeMap::from([("who".to_string(), "me".to_string())]),
            modified: "2026-11-24T10:00:00Z".into(),
            chunks: vec![ChunkId([1; 32])],
            sealed: vec![40],
        }
    }

    fn state(objs: &[ObjectEntry]) -> State {
        objs.iter()
            .map(|o| ((o.bucket.clone(), o.key.clone()), o.clone()))
            .collect()
    }

    #[test]
    fn a_chain_of_diffs_adds_up_to_each_state() {
        let s0 = state(&[obj("b", "a", "1"), obj("b", "b", "1"), obj("c", "a", "1")]);
        let s1 = state(&[obj("b", "a", "2"), obj("c", "a", "1"), obj("c", "z", "1")]);
        let s2 = state(&[obj("b", "b", "3")]);
        let mut got = State::new();
        for (old, new) in [(&State::new(), &s0), (&s0, &s1), (&s1, &s2)] {
            let changes = diff(old, new);
            // Pages survive their encoding.
            let back = decode_page(&encode_page(&changes)).unwrap();
            assert_eq!(back, changes);
            apply(&mut got, back);
            assert_eq!(&got, new);
        }
        assert_eq!(diff(&s1, &s1), vec![]);
        // A differential against s0 takes it straight to s2.
        let mut from_full = s0.clone();
        apply(&mut from_full, diff(&s0, &s2));
        assert_eq!(from_full, s2);
    }

    #[test]
    fn manifests_round_trip_and_newer_ones_are_refused() {
        let m = Manifest {
            format: MANIFEST_FORMAT,
            id: "20261124T100000Z-0a1b2c".into(),
            kind: Kind::Differential,
            parent: Some("20261123T100000Z-000000".into()),
            buckets: vec!["a".into(), "b".into()],
            time: "2026-11-24T10:00:00Z".into(),
            finished: "2026-11-24T10:01:00Z".into(),
            objects: 5,
            bytes: 100,
            bytes_stored: 40,
            bytes_new: 60,
            bucket_settings: BTreeMap::new(),
            pages: 1,
            sorted: true,
        };
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(text.contains("\"type\":\"differential\""), "{text}");
        assert_eq!(Manifest::decode(text.as_bytes()).unwrap(), m);
        let newer = text.replace("\"format\":1", "\"format\":2");
        assert!(matches!(
            Manifest::decode(newer.as_bytes()),
            Err(BackupError::Format(_))
        ));
        assert!(matches!(
            Manifest::decode(b"{}"),
            Err(BackupError::Corrupt(_))
        ));
        assert!(matches!(
            decode_page(b"[{\"op\":\"move\"}]"),
            Err(BackupError::Corrupt(_))
        ));
    }

    #[test]
    fn names_at_the_target() {
        assert_eq!(manifest_name("x"), "backups/x/manifest");
        assert_eq!(page_name("x", 7), "backups/x/page-000007");
        let id = ChunkId([0xab; 32]);
        assert_eq!(chunk_name(&id), format!("chunks/ab/{}", "ab".repeat(32)));
        assert_eq!("full".parse::<Kind>().unwrap(), Kind::Full);
        assert!("weekly".parse::<Kind>().is_err());
    }
}
