//! Mapping of storage errors to S3 errors.
//!
//! Every error a client sees is an S3 error with the right code and status; causes
//! that are ours (disk, metadata) are logged here with their details, and the client
//! gets a message that names the cause without leaking paths.

use s3s::{S3Error, S3ErrorCode, s3_error};

use cairn_blocks::BlockError;
use cairn_meta::MetaError;

/// The error code cairn returns when the disk is full. S3 has no such code; 507
/// (Insufficient Storage) is what HTTP has for it.
pub const STORAGE_FULL: &str = "XCairnStorageFull";

pub fn storage_full(what: &str) -> S3Error {
    let mut e = S3Error::with_message(
        S3ErrorCode::Custom(STORAGE_FULL.into()),
        format!("The server's disk is full: {what} could not be stored. Free space and retry."),
    );
    e.set_status_code(http::StatusCode::INSUFFICIENT_STORAGE);
    e
}

pub fn meta(e: MetaError) -> S3Error {
    match e {
        MetaError::NoSuchBucket => s3_error!(NoSuchBucket, "The specified bucket does not exist"),
        MetaError::BucketAlreadyOwnedByYou => s3_error!(
            BucketAlreadyOwnedByYou,
            "Your previous request to create the named bucket succeeded and you already own it."
        ),
        MetaError::BucketNotEmpty => s3_error!(
            BucketNotEmpty,
            "The bucket you tried to delete is not empty"
        ),
        MetaError::NoSuchKey => s3_error!(NoSuchKey, "The specified key does not exist."),
        MetaError::NoSuchUpload => s3_error!(
            NoSuchUpload,
            "The specified multipart upload does not exist. The upload ID may be invalid, or the upload may have been aborted or completed."
        ),
        MetaError::PreconditionFailed => {
            s3_error!(
                PreconditionFailed,
                "At least one of the pre-conditions you specified did not hold"
            )
        }
        MetaError::InvalidPart(n) => s3_error!(
            InvalidPart,
            "One or more of the specified parts could not be found or its ETag did not match (part {n})."
        ),
        MetaError::NoSpace(detail) => {
            tracing::error!(%detail, "metadata write failed: disk full");
            storage_full("the metadata")
        }
        MetaError::Closed => s3_error!(ServiceUnavailable, "The server is shutting down"),
        MetaError::Unavailable => s3_error!(
            ServiceUnavailable,
            "The cluster cannot serve this now (no quorum, or recovering); retry shortly"
        ),
        e @ (MetaError::Encoding(_) | MetaError::Storage(_) | MetaError::Refused(_)) => {
            tracing::error!(error = %e, "metadata error");
            s3_error!(InternalError, "Internal error in the metadata store")
        }
    }
}

pub fn block(e: BlockError) -> S3Error {
    match e {
        BlockError::NoSpace { path } => {
            tracing::error!(path = %path.display(), "block write failed: disk full");
            storage_full("the object data")
        }
        e => {
            tracing::error!(error = %e, "block store error");
            s3_error!(InternalError, "Internal error in the block store")
        }
    }
}

pub fn data(e: cairn_cluster::DataError) -> S3Error {
    match e {
        cairn_cluster::DataError::Block(e) => block(e),
        cairn_cluster::DataError::Unavailable(detail) => {
            tracing::error!(%detail, "too few nodes could serve a block");
            s3_error!(
                ServiceUnavailable,
                "Too few storage nodes are reachable to serve this now; retry shortly"
            )
        }
    }
}

pub fn join(e: tokio::task::JoinError) -> S3Error {
    tracing::error!(error = %e, "blocking task failed");
    s3_error!(InternalError, "Internal error")
}
