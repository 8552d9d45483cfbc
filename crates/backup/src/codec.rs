//! How a backup's files are sealed: every chunk and every manifest page is
//! compressed (zstd) and, when the target is encrypted, encrypted with an
//! authenticated cipher (XChaCha20-Poly1305, a random nonce per file).
//!
//! A sealed file is a 16-byte header, then (encrypted) a 24-byte nonce, then
//! the body:
//!
//! ```text
//! "CRNB" | version (1) | flags (1: bit 0 zstd, bit 1 encrypted) | 0 0 | plain length (u64 LE)
//! ```
//!
//! The header is authenticated with the body (it is the cipher's associated
//! data), so a flipped flag or length is caught like a flipped byte of data.
//!
//! A chunk is named by the BLAKE3 hash of its plain bytes; on an encrypted
//! target by a keyed BLAKE3 hash (a key derived from the backup key), so the
//! names say nothing about the contents to whoever can list the target.

use chacha20poly1305::aead::{Aead, AeadInPlace, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::BackupError;
use crate::pagebuf::PageBuf;

const MAGIC: &[u8; 4] = b"CRNB";
const VERSION: u8 = 1;
const HEADER_LEN: usize = 16;
const NONCE_LEN: usize = 24;
/// The length of the cipher's authentication tag, after the ciphertext.
const TAG_LEN: usize = 16;
/// Bytes a sealed file holds beyond its body: header, nonce and tag.
pub const OVERHEAD: usize = HEADER_LEN + NONCE_LEN + 16;
const FLAG_ZSTD: u8 = 1;
const FLAG_ENCRYPTED: u8 = 2;
/// Whether compressing `plain` would gain anything: a large chunk is judged by
/// three samples (its start, middle and end), so that video, archives and other
/// already compressed data cost no compression time.
fn worth_compressing(plain: &[u8]) -> bool {
    const SAMPLE: usize = 16 << 10;
    if plain.len() < 16 * SAMPLE {
        return true;
    }
    let mid = plain.len() / 2 - SAMPLE / 2;
    let mut sample = Vec::with_capacity(3 * SAMPLE);
    for at in [0, mid, plain.len() - SAMPLE] {
        sample.extend_from_slice(&plain[at..at + SAMPLE]);
    }
    match zstd::bulk::compress(&sample, LEVEL) {
        // At least 5% smaller, or it is not worth the time.
        Ok(p) => p.len() * 100 < sample.len() * 95,
        Err(_) => true,
    }
}

/// zstd's level: fast, and most of the gain on text and logs.
const LEVEL: i32 = 3;

/// A chunk's or a sealed file's name: 32 bytes, written as 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<ChunkId> {
        let mut b = [0u8; 32];
        hex::decode_to_slice(s, &mut b).ok()?;
        Some(ChunkId(b))
    }
}

impl serde::Serialize for ChunkId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for ChunkId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ChunkId, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        ChunkId::from_hex(&s).ok_or_else(|| serde::de::Error::custom("not 64 hex digits"))
    }
}

/// The 32-byte backup key (`cairn backup keygen`), as 64 hex digits.
#[derive(Clone)]
pub struct BackupKey([u8; 32]);

impl BackupKey {
    /// Reads a key written as 64 hex digits (surrounding white space allowed).
    pub fn parse(text: &str) -> Result<BackupKey, BackupError> {
        let mut k = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut k).map_err(|_| {
            BackupError::Key(
                "a backup key is 64 hex digits (cairn backup keygen FILE makes one)".into(),
            )
        })?;
        Ok(BackupKey(k))
    }

    /// A new random key.
    pub fn generate() -> BackupKey {
        BackupKey(rand::random())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// What a target records to tell a wrong key from a right one (a hash that
    /// reveals nothing of the key).
    pub fn check_value(&self) -> String {
        hex::encode(&blake3::derive_key("cairn backup v1 key check", &self.0)[..16])
    }
}

impl std::fmt::Debug for BackupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackupKey(..)")
    }
}

/// Seals and opens the files of one target: with a key (encrypted) or without.
#[derive(Clone)]
pub struct Codec {
    keys: Option<Keys>,
}

#[derive(Clone)]
struct Keys {
    cipher: XChaCha20Poly1305,
    ids: [u8; 32],
}

impl Codec {
    pub fn plain() -> Codec {
        Codec { keys: None }
    }

    pub fn encrypted(key: &BackupKey) -> Codec {
        let enc = blake3::derive_key("cairn backup v1 encryption", &key.0);
        Codec {
            keys: Some(Keys {
                cipher: XChaCha20Poly1305::new((&enc).into()),
                ids: blake3::derive_key("cairn backup v1 chunk names", &key.0),
            }),
        }
    }

    pub fn is_encrypted(&self) -> bool {
        self.keys.is_some()
    }

    /// The name of a chunk of these bytes.
    pub fn chunk_id(&self, plain: &[u8]) -> ChunkId {
        let mut h = self.chunk_hasher();
        h.update(plain);
        ChunkId(*h.finalize().as_bytes())
    }

    /// A hasher that, fed a chunk's bytes, gives its name.
    pub fn chunk_hasher(&self) -> blake3::Hasher {
        match &self.keys {
            None => blake3::Hasher::new(),
            Some(k) => blake3::Hasher::new_keyed(&k.ids),
        }
    }

    /// Where a chunk's plain bytes start in a buffer sealed in place: after
    /// the header (and the nonce, when encrypting).
    pub fn body_offset(&self) -> usize {
        match self.keys {
            None => HEADER_LEN,
            Some(_) => HEADER_LEN + NONCE_LEN,
        }
    }

    /// Room a buffer sealed in place needs for `plain` bytes.
    pub fn sealed_capacity(&self, plain: usize) -> usize {
        self.body_offset() + plain + TAG_LEN
    }

    /// The sealed form of `plain` (see [`seal_in_place`](Self::seal_in_place)).
    pub fn seal(&self, plain: &[u8]) -> Result<PageBuf, BackupError> {
        let mut buf = PageBuf::new(self.sealed_capacity(plain.len()));
        buf.set_len(self.body_offset());
        buf.fill(plain);
        self.seal_in_place(buf)
    }

    /// Seals the plain bytes `buf` holds after [`body_offset`](Self::body_offset)
    /// where they are: compressed when that makes them smaller, encrypted when
    /// the codec has a key, the header written in front. `buf` needs room for
    /// [`sealed_capacity`](Self::sealed_capacity) bytes.
    pub fn seal_in_place(&self, mut buf: PageBuf) -> Result<PageBuf, BackupError> {
        let at = self.body_offset();
        if buf.len() < at || buf.capacity() < buf.len() + TAG_LEN {
            return Err(BackupError::Usage(
                "a buffer too small to be sealed in place".into(),
            ));
        }
        let plain_len = buf.len() - at;
        let mut flags = 0;
        if worth_compressing(&buf[at..]) {
            let packed = zstd::bulk::compress(&buf[at..], LEVEL)
                .map_err(|e| BackupError::Corrupt(format!("compressing: {e}")))?;
            if packed.len() < plain_len {
                buf.set_len(at);
                buf.fill(&packed);
                flags |= FLAG_ZSTD;
            }
        }
        if self.keys.is_some() {
            flags |= FLAG_ENCRYPTED;
        }
        let head = buf.as_mut_slice();
        head[..4].copy_from_slice(MAGIC);
        head[4] = VERSION;
        head[5] = flags;
        head[6..8].copy_from_slice(&[0, 0]);
        head[8..HEADER_LEN].copy_from_slice(&(plain_len as u64).to_le_bytes());
        if let Some(k) = &self.keys {
            let nonce: [u8; NONCE_LEN] = rand::random();
            let all = buf.as_mut_slice();
            all[HEADER_LEN..at].copy_from_slice(&nonce);
            let (head, msg) = all.split_at_mut(at);
            let tag = k
                .cipher
                .encrypt_in_place_detached(XNonce::from_slice(&nonce), &head[..HEADER_LEN], msg)
                .map_err(|_| BackupError::Corrupt("encrypting failed".into()))?;
            buf.fill(&tag);
        }
        Ok(buf)
    }

    /// The plain bytes of a sealed file, checked: its header, its cipher's tag,
    /// and its length, which must not exceed `max_len`. What is wrong with it
    /// is said in the error (the caller names the file).
    pub fn open(&self, sealed: &[u8], max_len: usize) -> Result<Vec<u8>, BackupError> {
        let bad = |why: &str| BackupError::Corrupt(why.to_string());
        if sealed.len() < HEADER_LEN || &sealed[..4] != MAGIC {
            return Err(bad("not a sealed backup file (bad magic)"));
        }
        if sealed[4] != VERSION {
            return Err(BackupError::Format(format!(
                "a file of format {} (this cairn reads format {VERSION})",
                sealed[4]
            )));
        }
        let flags = sealed[5];
        if flags & !(FLAG_ZSTD | FLAG_ENCRYPTED) != 0 || sealed[6..8] != [0, 0] {
            return Err(bad("unknown flags in the header"));
        }
        let mut len8 = [0u8; 8];
        len8.copy_from_slice(&sealed[8..16]);
        let len = u64::from_le_bytes(len8);
        if len > max_len as u64 {
            return Err(bad(&format!(
                "says it holds {len} bytes, more than {max_len}"
            )));
        }
        let len = len as usize;
        let header = &sealed[..HEADER_LEN];
        let body: std::borrow::Cow<'_, [u8]> = match (&self.keys, flags & FLAG_ENCRYPTED != 0) {
            (None, false) => sealed[HEADER_LEN..].into(),
            (Some(k), true) => {
                if sealed.len() < HEADER_LEN + NONCE_LEN {
                    return Err(bad("truncated"));
                }
                let nonce = XNonce::from_slice(&sealed[HEADER_LEN..HEADER_LEN + NONCE_LEN]);
                k.cipher
                    .decrypt(
                        nonce,
                        Payload {
                            msg: &sealed[HEADER_LEN + NONCE_LEN..],
                            aad: header,
                        },
                    )
                    .map_err(|_| bad("fails its authentication (damaged, or another key)"))?
                    .into()
            }
            (None, true) => {
                return Err(BackupError::Key(
                    "the file is encrypted and no key was given".into(),
                ));
            }
            (Some(_), false) => return Err(bad("not encrypted, on an encrypted target")),
        };
        let plain = if flags & FLAG_ZSTD != 0 {
            zstd::bulk::decompress(&body, len).map_err(|e| bad(&format!("undecodable: {e}")))?
        } else {
            body.into_owned()
        };
        if plain.len() != len {
            return Err(bad(&format!(
                "holds {} bytes where its header says {len}",
                plain.len()
            )));
        }
        Ok(plain)
    }

    /// Opens a sealed chunk and checks that its bytes are the ones its name
    /// says.
    pub fn open_chunk(
        &self,
        id: &ChunkId,
        sealed: &[u8],
        max_len: usize,
    ) -> Result<Vec<u8>, BackupError> {
        let plain = self.open(sealed, max_len)?;
        if self.chunk_id(&plain) != *id {
            return Err(BackupError::Corrupt(
                "its bytes do not match its name".into(),
            ));
        }
        Ok(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn both() -> Vec<Codec> {
        vec![Codec::plain(), Codec::encrypted(&BackupKey::generate())]
    }

    #[test]
    fn sealed_files_open_to_their_bytes() {
        for c in both() {
            for data in [
                Vec::new(),
                b"hello".to_vec(),
                vec![7u8; 1 << 20],
                (0..100_000u32).flat_map(|i| i.to_le_bytes()).collect(),
            ] {
                let id = c.chunk_id(&data);
                let sealed = c.seal(&data).unwrap().to_vec();
                assert_eq!(c.open_chunk(&id, &sealed, 1 << 21).unwrap(), data);
            }
        }
    }

    #[test]
    fn repetitive_bytes_are_compressed() {
        let data = vec![b'a'; 1 << 20];
        for c in both() {
            assert!(c.seal(&data).unwrap().to_vec().len() < 10_000);
        }
    }

    #[test]
    fn random_bytes_are_stored_as_they_are_and_mixed_ones_compressed() {
        let mut random = vec![0u8; 1 << 20];
        rand::fill(&mut random[..]);
        let text: Vec<u8> = b"a log line of some service, time=12:00:00 level=info\n"
            .iter()
            .copied()
            .cycle()
            .take(1 << 20)
            .collect();
        // Random but for its middle: judged by the samples, compressed.
        let mut mixed = random.clone();
        mixed[400 << 10..600 << 10].copy_from_slice(&text[..200 << 10]);
        for c in both() {
            let sealed = c.seal(&random).unwrap().to_vec();
            assert_eq!(sealed[5] & FLAG_ZSTD, 0, "random bytes were compressed");
            assert_eq!(c.open(&sealed, 1 << 21).unwrap(), random);
            let sealed = c.seal(&text).unwrap().to_vec();
            assert_ne!(sealed[5] & FLAG_ZSTD, 0);
            assert!(sealed.len() < 20_000);
            let sealed = c.seal(&mixed).unwrap().to_vec();
            assert_ne!(sealed[5] & FLAG_ZSTD, 0, "a compressible middle was missed");
            assert_eq!(c.open(&sealed, 1 << 21).unwrap(), mixed);
        }
    }

    #[test]
    fn encrypted_files_show_no_plain_bytes_and_names_depend_on_the_key() {
        let marker = b"PLAINTEXT-MARKER-4711".repeat(100);
        let (k1, k2) = (BackupKey::generate(), BackupKey::generate());
        let (c1, c2) = (Codec::encrypted(&k1), Codec::encrypted(&k2));
        let sealed = c1.seal(&marker).unwrap().to_vec();
        assert!(!sealed.windows(21).any(|w| w == b"PLAINTEXT-MARKER-4711"));
        assert_ne!(c1.chunk_id(&marker), c2.chunk_id(&marker));
        assert_ne!(c1.chunk_id(&marker), Codec::plain().chunk_id(&marker));
        // Sealing twice gives different bytes (a fresh nonce each time).
        assert_ne!(sealed, c1.seal(&marker).unwrap().to_vec());
        // Another key, or none, is refused with a clear error.
        assert!(matches!(
            c2.open(&sealed, 1 << 20),
            Err(BackupError::Corrupt(_))
        ));
        assert!(matches!(
            Codec::plain().open(&sealed, 1 << 20),
            Err(BackupError::Key(_))
        ));
        assert_ne!(k1.check_value(), k2.check_value());
    }

    #[test]
    fn any_flipped_byte_is_caught() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        for c in both() {
            let id = c.chunk_id(&data);
            let sealed = c.seal(&data).unwrap().to_vec();
            for at in 0..sealed.len() {
                let mut bad = sealed.clone();
                bad[at] ^= 0x01;
                assert!(c.open_chunk(&id, &bad, 1 << 20).is_err(), "byte {at}");
            }
            assert!(
                c.open_chunk(&id, &sealed[..sealed.len() - 1], 1 << 20)
                    .is_err()
            );
        }
    }

    #[test]
    fn a_length_over_the_limit_is_refused_before_decoding() {
        let c = Codec::plain();
        let sealed = c.seal(&vec![0u8; 4096]).unwrap().to_vec();
        assert!(matches!(
            c.open(&sealed, 4095),
            Err(BackupError::Corrupt(_))
        ));
    }

    #[test]
    fn keys_parse_from_hex_only() {
        let k = BackupKey::generate();
        let back = BackupKey::parse(&format!("  {}\n", k.to_hex())).unwrap();
        assert_eq!(back.check_value(), k.check_value());
        assert!(BackupKey::parse("abc").is_err());
        assert!(BackupKey::parse(&"zz".repeat(32)).is_err());
    }

    proptest! {
        /// Whatever the bytes (random, runs, or both), sealing where they lie
        /// and opening gives them back under their name.
        #[test]
        fn any_bytes_seal_in_place_and_open_to_themselves(
            parts in proptest::collection::vec((any::<u8>(), 0usize..5000, any::<bool>()), 0..8),
        ) {
            let mut data = Vec::new();
            for (b, n, run) in parts {
                data.extend((0..n).map(|i| if run { b } else { (i as u8).wrapping_mul(b) ^ (i >> 8) as u8 }));
            }
            for c in both() {
                let id = c.chunk_id(&data);
                let sealed = c.seal(&data).unwrap();
                prop_assert!(sealed.len() <= c.sealed_capacity(data.len()));
                prop_assert_eq!(c.open_chunk(&id, &sealed, 1 << 16).unwrap(), data.clone());
            }
        }

        #[test]
        fn arbitrary_bytes_never_open_wrongly(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            for c in both() {
                let id = c.chunk_id(b"something else");
                prop_assert!(c.open_chunk(&id, &bytes, 1 << 16).is_err());
                let _ = c.open(&bytes, 1 << 16);
            }
        }
    }
}
