//! Byte keys of the metadata tables.
//!
//! Bucket names never contain a NUL byte and object keys are refused if they do, so
//! `bucket 0x00 key` sorts all of a bucket's objects together, in S3's order (UTF-8
//! bytes). 0xFF never occurs in UTF-8, so `prefix ++ [0xFF]` is past every key that
//! starts with `prefix`.

pub const SEP: u8 = 0;
pub const PAST: u8 = 0xFF;

pub fn object(bucket: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(bucket.len() + 1 + key.len());
    k.extend_from_slice(bucket.as_bytes());
    k.push(SEP);
    k.extend_from_slice(key.as_bytes());
    k
}

/// The first and the past-the-end keys of a bucket's objects.
pub fn bucket_range(bucket: &str) -> (Vec<u8>, Vec<u8>) {
    let mut lo = bucket.as_bytes().to_vec();
    lo.push(SEP);
    let mut hi = bucket.as_bytes().to_vec();
    hi.push(SEP + 1);
    (lo, hi)
}

pub fn upload(bucket: &str, key: &str, upload_id: &str) -> Vec<u8> {
    let mut k = object(bucket, key);
    k.push(SEP);
    k.extend_from_slice(upload_id.as_bytes());
    k
}

/// Splits an upload key into (key, upload id), given its bucket.
pub fn split_upload<'a>(bucket: &str, raw: &'a [u8]) -> Option<(&'a str, &'a str)> {
    let rest = raw.get(bucket.len() + 1..)?;
    let pos = rest.iter().rposition(|&b| b == SEP)?;
    let key = std::str::from_utf8(&rest[..pos]).ok()?;
    let id = std::str::from_utf8(&rest[pos + 1..]).ok()?;
    Some((key, id))
}

pub fn part(upload_id: &str, part_number: u32) -> Vec<u8> {
    let mut k = upload_id.as_bytes().to_vec();
    k.push(SEP);
    k.extend_from_slice(&part_number.to_be_bytes());
    k
}

pub fn part_range(upload_id: &str) -> (Vec<u8>, Vec<u8>) {
    (part(upload_id, 0), {
        let mut hi = upload_id.as_bytes().to_vec();
        hi.push(SEP + 1);
        hi
    })
}

pub fn part_number_of(raw: &[u8]) -> u32 {
    let n = raw.len();
    if n < 4 {
        return 0;
    }
    u32::from_be_bytes([raw[n - 4], raw[n - 3], raw[n - 2], raw[n - 1]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_ranges_do_not_overlap() {
        let (lo, hi) = bucket_range("a");
        let inside = object("a", "zzz\u{10FFFF}");
        let other = object("a-b", "");
        assert!(lo <= inside && inside < hi);
        assert!(!(lo <= other && other < hi));
    }

    #[test]
    fn upload_key_splits() {
        let k = upload("b", "x/y", "00ff-abc");
        assert_eq!(split_upload("b", &k), Some(("x/y", "00ff-abc")));
    }

    #[test]
    fn part_numbers_sort_numerically() {
        assert!(part("u", 2) < part("u", 10));
        assert_eq!(part_number_of(&part("u", 77)), 77);
        let (lo, hi) = part_range("u");
        assert!(lo <= part("u", 1) && part("u", 10000) < hi);
    }
}
