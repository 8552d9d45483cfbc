//! cairn's metadata: buckets, objects, multipart uploads and access keys, replicated
//! by Raft (openraft).
//!
//! Reads go to the tables (redb) directly, or to the cache of object records. Every
//! change is a [`Command`]; concurrent commands are batched into one entry of the
//! Raft log (`store.rs::batcher`). The log store (`raft/log_store.rs`, on the
//! segment files of `segments.rs`) writes every entry waiting at that moment with one
//! synchronous write (group commit); once committed, the state machine
//! (`raft/state_machine.rs`) applies the entry's commands in order in one redb
//! transaction, committed without an fsync of its own, and each caller gets its
//! command's result. Nothing is visible to readers before it is durable in the log.
//! Checkpoints (durable redb commits) make the tables durable in bulk; after a crash
//! the entries after the last checkpoint are applied again from the log.
//!
//! Commands are deterministic functions of the stored state and their own fields
//! (times are carried in the command, never read while applying): every replica
//! applying the same entries gets the same tables and the same results.

mod apply;
mod cache;
mod keys;
mod log;
pub mod raft;
mod records;
mod segments;
mod store;

pub use records::{
    BucketRecord, Checksums, ClassedBlock, DEFAULT_REPLICATION, KeyRecord, Layout, LayoutNode,
    NodeState, ObjectData, ObjectRecord, PartRecord, RECORD_VERSION, StoredHeaders, UploadRecord,
};
pub use store::{
    DEFAULT_CACHE_BYTES, DEFAULT_LOG_KEEP, DEFAULT_SNAPSHOT_EVERY, ListEntry, ListPage, ListQuery,
    MetaOptions, MetaStore, UploadEntry, restore_snapshot,
};

use cairn_types::{BlockHash, StorageClass, UnixMillis};

/// A change to the metadata. See the crate docs.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub enum Command {
    CreateBucket {
        bucket: String,
        now: UnixMillis,
    },
    DeleteBucket {
        bucket: String,
        now: UnixMillis,
    },
    PutObject {
        bucket: String,
        key: String,
        record: ObjectRecord,
        cond: WriteCondition,
    },
    /// Removing an absent key is not an error (as in S3).
    DeleteObject {
        bucket: String,
        key: String,
        now: UnixMillis,
    },
    CreateUpload {
        bucket: String,
        key: String,
        upload_id: String,
        record: UploadRecord,
    },
    PutPart {
        bucket: String,
        key: String,
        upload_id: String,
        part_number: u32,
        record: PartRecord,
    },
    /// Turns the named parts (number and the ETag the client listed) into the object.
    /// `record.data` is ignored: the object's blocks are the parts' blocks in order.
    CompleteUpload {
        bucket: String,
        key: String,
        upload_id: String,
        parts: Vec<(u32, String)>,
        record: ObjectRecord,
        cond: WriteCondition,
    },
    AbortUpload {
        bucket: String,
        key: String,
        upload_id: String,
        now: UnixMillis,
    },
    PutKey {
        access_key: String,
        record: KeyRecord,
    },
    /// Forgets garbage-collection candidates (block, time queued) that were handled.
    GcForget {
        entries: Vec<(BlockHash, UnixMillis)>,
    },
    /// Adds a node to the layout or replaces its entry (a new version only if
    /// something changed). The first node of a layout sets the replication factor.
    SetLayoutNode {
        node: LayoutNode,
    },
    /// Takes a node out of the layout.
    RemoveLayoutNode {
        id: u64,
    },
    /// Replication factor and write quorum (0: a majority of the copies).
    SetReplication {
        replication: u8,
        write_quorum: u8,
    },
    /// The storage class of buckets that name none (refused if the layout cannot
    /// place it).
    SetDefaultClass {
        class: StorageClass,
    },
    /// A bucket's storage class for its new objects (`None`: the cluster's default).
    SetBucketClass {
        bucket: String,
        class: Option<StorageClass>,
    },
}

impl Command {
    /// Whether the command changes the layout.
    pub fn is_layout(&self) -> bool {
        matches!(
            self,
            Command::SetLayoutNode { .. }
                | Command::RemoveLayoutNode { .. }
                | Command::SetReplication { .. }
                | Command::SetDefaultClass { .. }
        )
    }

    /// Roughly how many bytes the command adds to a log entry (for batching and
    /// checkpoint pacing).
    pub fn approx_size(&self) -> usize {
        match self {
            Command::PutObject { record, .. } => {
                256 + match &record.data {
                    ObjectData::Inline(d) => d.len(),
                    ObjectData::Blocks(b) => b.len() * 40,
                    ObjectData::Classed(b) => b.len() * 44,
                }
            }
            _ => 256,
        }
    }
}

/// A condition checked atomically with an object write.
#[derive(Clone, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum WriteCondition {
    #[default]
    None,
    /// `If-None-Match: *`: only if no object has this key.
    IfAbsent,
    /// `If-Match: <etag>`: only if the current object has this ETag.
    IfMatch(String),
}

/// What an applied command returns.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[allow(clippy::large_enum_variant)] // returned once per command
pub enum Outcome {
    Done,
    /// The object record as stored (for `CompleteUpload`).
    Object(ObjectRecord),
}

#[derive(Debug, thiserror::Error, Clone, serde::Serialize, serde::Deserialize)]
pub enum MetaError {
    #[error("the bucket does not exist")]
    NoSuchBucket,
    #[error("the bucket already exists and is yours")]
    BucketAlreadyOwnedByYou,
    #[error("the bucket is not empty")]
    BucketNotEmpty,
    #[error("the key does not exist")]
    NoSuchKey,
    #[error("the multipart upload does not exist")]
    NoSuchUpload,
    #[error("a precondition failed")]
    PreconditionFailed,
    #[error("part {0} was not found or its ETag does not match")]
    InvalidPart(u32),
    #[error("bad metadata record: {0}")]
    Encoding(String),
    #[error("metadata store: {0}")]
    Storage(String),
    #[error("no space left on device for metadata: {0}")]
    NoSpace(String),
    #[error("the metadata store is shut down")]
    Closed,
    #[error(
        "the metadata cannot be served now (no leader or quorum, or recovering from an I/O error)"
    )]
    Unavailable,
    /// An operation on the cluster refused, with the reason.
    #[error("{0}")]
    Refused(String),
}

pub type Result<T> = std::result::Result<T, MetaError>;

impl MetaError {
    pub(crate) fn is_no_space(&self) -> bool {
        matches!(self, MetaError::NoSpace(_))
    }

    /// A storage failure, told apart when it is a full disk (ENOSPC, errno 28).
    pub(crate) fn from_storage(msg: String) -> Self {
        if msg.contains("No space left") || msg.contains("os error 28") {
            MetaError::NoSpace(msg)
        } else {
            MetaError::Storage(msg)
        }
    }
}

macro_rules! storage_err {
    ($($t:ty),*) => {$(
        impl From<$t> for MetaError {
            fn from(e: $t) -> Self {
                MetaError::from_storage(e.to_string())
            }
        }
    )*};
}
storage_err!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);
