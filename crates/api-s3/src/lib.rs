//! The S3 API of cairn, on the s3s crate.
//!
//! s3s parses requests, checks SigV4 signatures (headers, presigned URLs,
//! aws-chunked bodies with trailers) and writes responses and XML errors; this crate
//! implements the operations on top of the metadata store (`cairn-meta`) and the
//! block store (`cairn-blocks`). The write path is in [`write`], the read path in
//! [`read`], the operations in [`ops`].

pub mod buffers;
pub mod error;
mod ops;
pub mod read;
pub mod write;

use std::sync::Arc;

use s3s::access::{S3Access, S3AccessContext};
use s3s::auth::{S3Auth, SecretKey};
use s3s::service::{S3Service, S3ServiceBuilder};
use s3s::{S3Result, s3_error};

use cairn_cluster::Blocks;
use cairn_meta::MetaStore;

/// S3's own limits, enforced with S3's errors.
pub mod limits {
    /// Longest object key, in bytes of UTF-8.
    pub const MAX_KEY_LEN: usize = 1024;
    /// Largest object a single PUT (or one part) may carry: 5 GiB.
    pub const MAX_PUT_SIZE: u64 = 5 << 30;
    /// Largest object made by multipart upload: 5 TiB.
    pub const MAX_OBJECT_SIZE: u64 = 5 << 40;
    /// Smallest part but the last.
    pub const MIN_PART_SIZE: u64 = 5 << 20;
    pub const MAX_PART_NUMBER: i32 = 10_000;
    /// Total size of the `x-amz-meta-*` names and values.
    pub const MAX_USER_METADATA: usize = 2 << 10;
    /// Keys in one DeleteObjects request.
    pub const MAX_DELETE_KEYS: usize = 1000;
}

/// Settings of the S3 front end.
#[derive(Clone, Debug)]
pub struct S3Settings {
    /// The SigV4 region requests must be signed for.
    pub region: String,
    /// Size of the blocks objects are cut into.
    pub block_size: usize,
    /// Objects up to this size are stored inline in their metadata record.
    pub inline_max: usize,
    /// Base domain for virtual-hosted-style requests (`bucket.<domain>`), if any.
    pub base_domain: Option<String>,
    /// Memory for block buffers of all requests together (uploads filling, hashing
    /// and writing blocks; downloads reading ahead). Requests wait for room beyond it.
    pub block_memory: usize,
}

impl Default for S3Settings {
    fn default() -> Self {
        S3Settings {
            region: "us-east-1".into(),
            // 4 MiB: large enough that a block's fsync and file are amortized over
            // plenty of bytes, small enough that two blocks per request in memory keep
            // 16 concurrent large uploads well under 300 MiB.
            block_size: 4 << 20,
            // Small objects (a few KiB) are read from metadata without touching a file.
            inline_max: 8 << 10,
            base_domain: None,
            // 128 MiB: 32 blocks of 4 MiB, enough for several large uploads and
            // downloads to stream at disk speed while the process stays small.
            block_memory: 128 << 20,
        }
    }
}

/// The S3 service state, shared by all requests.
#[derive(Clone)]
pub struct Cairn {
    pub meta: MetaStore,
    /// The cluster's blocks (this node's store, and the others' over RPC).
    pub blocks: Blocks,
    pub settings: Arc<S3Settings>,
    /// Block buffers of all requests (see [`S3Settings::block_memory`]).
    pub buffers: Arc<buffers::BlockBuffers>,
}

impl Cairn {
    pub fn new(meta: MetaStore, blocks: Blocks, settings: S3Settings) -> Self {
        let permits = (settings.block_memory / settings.block_size.max(1)).max(2);
        Cairn {
            meta,
            blocks,
            buffers: buffers::BlockBuffers::new(permits, settings.block_size),
            settings: Arc::new(settings),
        }
    }
}

/// Builds the hyper service for S3 requests.
pub fn service(c: Cairn) -> S3Result<S3Service> {
    let settings = c.settings.clone();
    let mut b = S3ServiceBuilder::new(c.clone());
    b.set_auth(KeyAuth {
        meta: c.meta.clone(),
    });
    b.set_access(RegionCheck {
        region: settings.region.clone(),
    });
    if let Some(domain) = &settings.base_domain {
        let host = s3s::host::SingleDomain::new(domain)
            .map_err(|e| s3_error!(InternalError, "bad base domain {domain}: {e}"))?;
        b.set_host(BaseDomain(host, domain.clone()));
    }
    Ok(b.build())
}

/// Virtual-hosted-style addressing under a base domain. Clients send the port in the
/// Host header when it is not 80 (`bucket.s3.example.com:9000`); it is not part of
/// the name.
/// Any other host name (an IP address, `localhost`) means a path-style request.
struct BaseDomain(s3s::host::SingleDomain, String);

impl s3s::host::S3Host for BaseDomain {
    fn parse_host_header<'a>(&'a self, host: &'a str) -> S3Result<s3s::host::VirtualHost<'a>> {
        let name = match host.rsplit_once(':') {
            Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
                name
            }
            _ => host,
        };
        let under_base = name.eq_ignore_ascii_case(&self.1)
            || (name.len() > self.1.len() + 1
                && name.as_bytes()[name.len() - self.1.len() - 1] == b'.'
                && name[name.len() - self.1.len()..].eq_ignore_ascii_case(&self.1));
        if under_base {
            self.0.parse_host_header(name)
        } else {
            Ok(s3s::host::VirtualHost::new(name))
        }
    }
}

/// Looks secret keys up in the metadata store.
struct KeyAuth {
    meta: MetaStore,
}

#[async_trait::async_trait]
impl S3Auth for KeyAuth {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<SecretKey> {
        if let Some(k) = self.meta.key(access_key) {
            return Ok(SecretKey::from(k.secret));
        }
        // A key created through another node, or before this node restarted, may not
        // be applied here yet: wait for every write acknowledged so far, then look again.
        self.meta.read_barrier().await.map_err(error::meta)?;
        match self.meta.key(access_key) {
            Some(k) => Ok(SecretKey::from(k.secret)),
            None => Err(s3_error!(
                InvalidAccessKeyId,
                "The AWS Access Key Id you provided does not exist in our records."
            )),
        }
    }
}

/// Requires a signed request, signed for the configured region.
struct RegionCheck {
    region: String,
}

/// The region of a SigV4 credential scope (`AK/date/region/service/aws4_request`).
fn scope_region(credential: &str) -> Option<&str> {
    credential.split('/').nth(2)
}

impl RegionCheck {
    fn signed_region(&self, cx: &S3AccessContext<'_>) -> Option<String> {
        if let Some(auth) = cx
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            && let Some(pos) = auth.find("Credential=")
        {
            let cred = &auth[pos + "Credential=".len()..];
            let cred = cred.split([',', ' ']).next().unwrap_or("");
            return scope_region(cred).map(str::to_string);
        }
        let query = cx.uri().query()?;
        for pair in query.split('&') {
            if let Some(v) = pair.strip_prefix("X-Amz-Credential=") {
                let decoded = percent_decode(v);
                return scope_region(&decoded).map(str::to_string);
            }
        }
        None
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[async_trait::async_trait]
impl S3Access for RegionCheck {
    async fn check(&self, cx: &mut S3AccessContext<'_>) -> S3Result<()> {
        if cx.credentials().is_none() {
            return Err(s3_error!(
                AccessDenied,
                "Anonymous access is not allowed; sign your requests."
            ));
        }
        if let Some(region) = self.signed_region(cx)
            && region != self.region
        {
            return Err(s3_error!(
                AuthorizationHeaderMalformed,
                "The authorization header is malformed; the region '{region}' is wrong; expecting '{}'",
                self.region
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_region_parses() {
        assert_eq!(
            scope_region("AK/20250101/eu-west-1/s3/aws4_request"),
            Some("eu-west-1")
        );
        assert_eq!(scope_region("AK"), None);
        assert_eq!(percent_decode("a%2Fb%2fc%"), "a/b/c%");
    }
}
