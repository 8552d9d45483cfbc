//! What a chaos run records: every operation a client sent, when it was sent, when
//! its answer came and what the answer was.
//!
//! A history is saved as JSON lines: a [`Header`] first, then one [`Op`] per line,
//! so that a run's verdict can be computed again from the file alone
//! (`cairn chaos --check FILE`) and a failing history kept as a regression case.
//!
//! Values written are numbers: each PUT writes a value no other PUT writes, and the
//! object's bytes are a pure function of that number ([`body_of`]), so a GET names
//! the write it reads from and bytes that belong to no write are caught
//! ([`value_of`]).

use std::io::{self, BufRead, Write};

use serde::{Deserialize, Serialize};

/// Version of the history file format.
pub const FORMAT: u32 = 1;

/// What a client asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Call {
    /// PUT of the object whose bytes are `body_of(value)`.
    Put {
        value: u64,
    },
    /// PUT with `If-None-Match: *`: only if the key holds no object.
    PutIfAbsent {
        value: u64,
    },
    Delete,
    Get,
    /// ListObjectsV2 of the keys that start with the op's `key` (a prefix).
    List,
}

/// What came back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    /// A write or delete acknowledged.
    Ok,
    /// A GET answered with the bytes of `value`.
    Found { value: u64 },
    /// A GET answered 404 NoSuchKey.
    NotFound,
    /// A conditional PUT refused with 412: the key held an object.
    PreconditionFailed,
    /// A LIST answered with these keys.
    Listed { keys: Vec<String> },
    /// A GET answered 200 with bytes that are no value's: data was damaged.
    Corrupt { detail: String },
    /// Refused with a client error other than those above: the request changed
    /// nothing (a 403 for a clock the server disagrees with, say).
    Refused { status: u16, code: String },
    /// No answer, or a server error: the operation may or may not have taken
    /// effect (a timeout, a connection cut, a 503 after the write was proposed).
    Unknown { error: String },
}

/// One operation, as the client saw it. Times are microseconds since the run began,
/// on the clients' clock (one monotonic clock for all of them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    pub id: u64,
    pub client: u32,
    /// The node the request was sent to.
    pub node: u32,
    /// The object key (for a LIST: the prefix).
    pub key: String,
    #[serde(flatten)]
    pub call: Call,
    pub invoked_us: u64,
    /// When the answer came, or when the client gave up on it.
    pub completed_us: u64,
    #[serde(flatten)]
    pub outcome: Outcome,
}

impl Op {
    /// Whether the op may change the key's object.
    pub fn is_write(&self) -> bool {
        matches!(
            self.call,
            Call::Put { .. } | Call::PutIfAbsent { .. } | Call::Delete
        )
    }

    /// Whether it may have taken effect although no answer said so.
    pub fn is_unknown(&self) -> bool {
        matches!(self.outcome, Outcome::Unknown { .. })
    }
}

/// The first line of a history file: what the run was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub format: u32,
    pub bucket: String,
    /// Every key the clients used (a LIST is checked against each under its prefix).
    pub keys: Vec<String>,
    /// Free-form description of the run (nodes, faults, seed).
    #[serde(default)]
    pub run: serde_json::Value,
}

/// A whole history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    pub header: Header,
    pub ops: Vec<Op>,
}

impl History {
    pub fn write_to(&self, mut w: impl Write) -> io::Result<()> {
        serde_json::to_writer(&mut w, &self.header)?;
        w.write_all(b"\n")?;
        for op in &self.ops {
            serde_json::to_writer(&mut w, op)?;
            w.write_all(b"\n")?;
        }
        w.flush()
    }

    /// Reads a history file; a bad line is an error naming its number.
    pub fn read_from(r: impl BufRead) -> io::Result<History> {
        let bad = |n: usize, e: &dyn std::fmt::Display| {
            io::Error::new(io::ErrorKind::InvalidData, format!("history line {n}: {e}"))
        };
        let mut lines = r.lines().enumerate();
        let header: Header = match lines.next() {
            Some((_, l)) => serde_json::from_str(&l?).map_err(|e| bad(1, &e))?,
            None => return Err(bad(1, &"empty file")),
        };
        if header.format != FORMAT {
            return Err(bad(
                1,
                &format!(
                    "history format {} (this binary reads {FORMAT})",
                    header.format
                ),
            ));
        }
        let mut ops = Vec::new();
        for (i, l) in lines {
            let l = l?;
            if l.trim().is_empty() {
                continue;
            }
            ops.push(serde_json::from_str(&l).map_err(|e| bad(i + 1, &e))?);
        }
        Ok(History { header, ops })
    }
}

/// Size of the object written for `value`: mostly small (kept inline in the
/// metadata), some in blocks, so that both paths are exercised; small enough
/// that a long run at full speed stays within a modest disk.
pub fn size_of(value: u64) -> usize {
    match mix(value) % 8 {
        0 => 256 << 10,
        1 => 64 << 10,
        2 => 16 << 10,
        _ => 16 + (mix(value ^ 0x5bd1) % 4000) as usize,
    }
}

/// The bytes written for `value`: the value, its size, then a stream that only
/// this value produces.
pub fn body_of(value: u64) -> Vec<u8> {
    let size = size_of(value);
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&value.to_le_bytes());
    out.extend_from_slice(&(size as u64).to_le_bytes());
    let mut x = mix(value);
    while out.len() < size {
        x = mix(x);
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(size);
    out
}

/// The value whose bytes these are, or why they are no value's.
pub fn value_of(bytes: &[u8]) -> Result<u64, String> {
    if bytes.len() < 16 {
        return Err(format!("{} bytes: shorter than any value", bytes.len()));
    }
    let mut v = [0u8; 8];
    v.copy_from_slice(&bytes[..8]);
    let value = u64::from_le_bytes(v);
    let want = body_of(value);
    if bytes.len() != want.len() {
        return Err(format!(
            "{} bytes where value {value} has {}",
            bytes.len(),
            want.len()
        ));
    }
    match bytes.iter().zip(&want).position(|(a, b)| a != b) {
        None => Ok(value),
        Some(at) => Err(format!("bytes of value {value} differ from offset {at}")),
    }
}

/// A 64-bit mixing function (splitmix64's finalizer).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any bytes read as a history give a history or an error, never a panic.
        #[test]
        fn any_file_reads_or_fails_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = History::read_from(&bytes[..]);
        }

        /// Lines that are almost right fail cleanly too.
        #[test]
        fn damaged_lines_fail_cleanly(cut in 0usize..200, flip in any::<u8>()) {
            let mut text = String::from("{\"format\":1,\"bucket\":\"b\",\"keys\":[\"k\"]}\n");
            text.push_str("{\"id\":0,\"client\":1,\"node\":0,\"key\":\"k\",\"op\":\"put\",\"value\":3,\"invoked_us\":1,\"completed_us\":2,\"result\":\"ok\"}\n");
            let mut b = text.into_bytes();
            let at = cut % b.len();
            b[at] = flip;
            let _ = History::read_from(&b[..]);
        }
    }

    #[test]
    fn bodies_name_their_value_and_damage_is_caught() {
        for v in [0u64, 1, 7, 12345, u64::MAX] {
            let mut b = body_of(v);
            assert_eq!(b.len(), size_of(v));
            assert_eq!(value_of(&b), Ok(v));
            let last = b.len() - 1;
            b[last] ^= 1;
            assert!(value_of(&b).is_err());
            b[last] ^= 1;
            b.pop();
            assert!(value_of(&b).is_err());
        }
        assert!(value_of(b"short").is_err());
    }

    #[test]
    fn a_history_reads_back_as_written() {
        let h = History {
            header: Header {
                format: FORMAT,
                bucket: "b".into(),
                keys: vec!["k0".into(), "k1".into()],
                run: serde_json::json!({"seed": 1}),
            },
            ops: vec![
                Op {
                    id: 0,
                    client: 1,
                    node: 2,
                    key: "k0".into(),
                    call: Call::Put { value: 9 },
                    invoked_us: 10,
                    completed_us: 20,
                    outcome: Outcome::Ok,
                },
                Op {
                    id: 1,
                    client: 1,
                    node: 0,
                    key: "k".into(),
                    call: Call::List,
                    invoked_us: 30,
                    completed_us: 40,
                    outcome: Outcome::Listed {
                        keys: vec!["k0".into()],
                    },
                },
                Op {
                    id: 2,
                    client: 2,
                    node: 0,
                    key: "k1".into(),
                    call: Call::Delete,
                    invoked_us: 30,
                    completed_us: 5_000_000,
                    outcome: Outcome::Unknown {
                        error: "timed out".into(),
                    },
                },
            ],
        };
        let mut buf = Vec::new();
        h.write_to(&mut buf).unwrap();
        let back = History::read_from(&buf[..]).unwrap();
        assert_eq!(back, h);
        // A damaged line is named.
        let mut text = String::from_utf8(buf).unwrap();
        text.push_str("{\"id\": \n");
        let err = History::read_from(text.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("line 5"), "{err}");
    }
}
