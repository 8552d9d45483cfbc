//! Backups of cairn's buckets: full, incremental and differential, to a local
//! folder or any S3 endpoint, restored to any point they kept.
//!
//! A target holds content-addressed chunks (deduplicated across every backup
//! there), sealed by [`codec`] (zstd, and XChaCha20-Poly1305 with a backup key),
//! and one manifest per backup naming its parent; a backup is committed by
//! writing its manifest last.

pub mod codec;
pub mod engine;
pub mod lock;
pub mod manifest;
pub mod pagebuf;
pub mod repo;
pub mod schedule;
pub mod target;

pub use codec::{BackupKey, ChunkId, Codec};

/// What can go wrong with a backup, a restore or a target.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// A file at the target is damaged (the caller names it).
    #[error("damaged: {0}")]
    Corrupt(String),
    /// A file or a target written by a newer cairn.
    #[error("unknown format: {0}")]
    Format(String),
    /// The key is missing, malformed or not the target's.
    #[error("{0}")]
    Key(String),
    /// Another backup or prune holds the target.
    #[error("the target is locked: {0}")]
    Locked(String),
    /// The endpoint backed up or restored into failed a request.
    #[error("{0}")]
    Source(String),
    /// What was asked cannot be done as asked.
    #[error("{0}")]
    Usage(String),
    /// The target could not be read or written.
    #[error("{0}")]
    Target(String),
}
