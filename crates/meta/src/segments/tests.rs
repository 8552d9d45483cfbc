use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

const SMALL: u64 = 4096;

fn open(dir: &Path) -> (SegmentLog, u64, Vec<Loc>) {
    SegmentLog::open_sized(dir, true, SMALL, &mut |_, _| Ok(())).unwrap()
}

fn payload(index: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (index as usize * 31 + i) as u8).collect()
}

fn append(log: &mut SegmentLog, first: u64, lens: &[usize]) {
    let ps: Vec<Vec<u8>> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| payload(first + i as u64, l))
        .collect();
    let refs: Vec<&[u8]> = ps.iter().map(|p| p.as_slice()).collect();
    log.append(first, &refs).unwrap();
}

/// The records read back at open: (index, payload).
fn read_back(dir: &Path) -> Vec<(u64, Vec<u8>)> {
    let (_, first, locs) = open(dir);
    locs.iter()
        .enumerate()
        .map(|(i, l)| (first + i as u64, l.read().unwrap()))
        .collect()
}

fn segment_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".seg"))
        .collect();
    v.sort();
    v
}

#[test]
fn records_survive_reopen_across_segments() {
    let d = tempfile::tempdir().unwrap();
    let (mut log, ..) = open(d.path());
    append(&mut log, 1, &[10, 20, 3000]);
    append(&mut log, 4, &[3000]); // does not fit: a second segment
    append(&mut log, 5, &[9000]); // larger than a segment: an oversized one
    append(&mut log, 6, &[0, 1]);
    assert_eq!(log.next_index(), 8);
    drop(log);
    // 1..=3 | 4 | 5 (oversized, exactly its size) | 6, 7
    assert_eq!(segment_files(d.path()).len(), 4);
    let got = read_back(d.path());
    let want: Vec<(u64, Vec<u8>)> = [
        (1, 10),
        (2, 20),
        (3, 3000),
        (4, 3000),
        (5, 9000),
        (6, 0),
        (7, 1),
    ]
    .into_iter()
    .map(|(i, l)| (i, payload(i, l)))
    .collect();
    assert_eq!(got, want);
    let (log, ..) = open(d.path());
    assert_eq!(log.next_index(), 8);
}

#[test]
fn a_torn_record_ends_the_log() {
    let d = tempfile::tempdir().unwrap();
    let (mut log, ..) = open(d.path());
    append(&mut log, 1, &[100, 100]);
    let seg = d.path().join(segment_name(1));
    drop(log);
    // Damage the second record's payload.
    let f = OpenOptions::new().write(true).open(&seg).unwrap();
    f.write_all_at(
        b"XX",
        HEADER_LEN + (RECORD_HEAD + 100 + RECORD_HEAD + 50) as u64,
    )
    .unwrap();
    let got = read_back(d.path());
    assert_eq!(got, vec![(1, payload(1, 100))]);
    // The log continues after the last good record.
    let (mut log, ..) = open(d.path());
    assert_eq!(log.next_index(), 2);
    append(&mut log, 2, &[7]);
    drop(log);
    assert_eq!(
        read_back(d.path()),
        vec![(1, payload(1, 100)), (2, payload(2, 7))]
    );
}

#[test]
fn appended_records_must_follow() {
    let d = tempfile::tempdir().unwrap();
    let (mut log, ..) = open(d.path());
    append(&mut log, 5, &[1]);
    let err = log.append(7, &[b"x"]).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    assert_eq!(log.next_index(), 6);
}

#[test]
fn a_truncated_tail_never_reads_back_once_overwritten() {
    let d = tempfile::tempdir().unwrap();
    let (mut log, ..) = open(d.path());
    append(&mut log, 1, &[100, 100, 100, 100]);
    log.truncate(2).unwrap();
    append(&mut log, 2, &[5]); // shorter than what it replaces
    drop(log);
    assert_eq!(
        read_back(d.path()),
        vec![(1, payload(1, 100)), (2, payload(2, 5))]
    );
}

#[test]
fn truncation_removes_later_segments() {
    let d = tempfile::tempdir().unwrap();
    let (mut log, ..) = open(d.path());
    append(&mut log, 1, &[3000]);
    append(&mut log, 2, &[3000]);
    append(&mut log, 3, &[3000]);
    assert_eq!(segment_files(d.path()).len(), 3);
    log.truncate(2).unwrap();
    assert_eq!(segment_files(d.path()), vec![segment_name(1)]);
    assert_eq!(log.next_index(), 2);
    append(&mut log, 2, &[10]);
    drop(log);
    assert_eq!(
        read_back(d.path()),
        vec![(1, payload(1, 3000)), (2, payload(2, 10))]
    );
}

#[test]
fn purging_removes_whole_segments_only() {
    let d = tempfile::tempdir().unwrap();
    let (mut log, ..) = open(d.path());
    for i in 1..=4 {
        append(&mut log, i, &[3000]);
    }
    log.purge(2).unwrap();
    assert_eq!(
        segment_files(d.path()),
        vec![segment_name(3), segment_name(4)]
    );
    drop(log);
    let got = read_back(d.path());
    assert_eq!(got.first().map(|r| r.0), Some(3));
    // Purging everything leaves an empty log that continues after the purge point.
    let (mut log, ..) = open(d.path());
    log.purge(10).unwrap();
    assert!(segment_files(d.path()).is_empty());
    assert_eq!(log.next_index(), 11);
    append(&mut log, 11, &[1]);
    drop(log);
    assert_eq!(read_back(d.path()), vec![(11, payload(11, 1))]);
}

#[test]
fn a_missing_middle_segment_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let (mut log, ..) = open(d.path());
    for i in 1..=3 {
        append(&mut log, i, &[3000]);
    }
    drop(log);
    fs::remove_file(d.path().join(segment_name(2))).unwrap();
    let err = SegmentLog::open_sized(d.path(), true, SMALL, &mut |_, _| Ok(()))
        .err()
        .unwrap();
    assert!(err.to_string().contains(&segment_name(3)), "{err}");
    assert!(err.to_string().contains("damaged"), "{err}");
}

#[test]
fn a_newer_segment_format_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let (mut log, ..) = open(d.path());
    append(&mut log, 1, &[1]);
    drop(log);
    let seg = d.path().join(segment_name(1));
    let mut h = header(1, &[0u8; 8]);
    h[8..12].copy_from_slice(&(SEGMENT_VERSION + 1).to_le_bytes());
    let crc = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Nvme, &h[..32]);
    h[32..40].copy_from_slice(&crc.to_le_bytes());
    OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .write_all_at(&h, 0)
        .unwrap();
    let err = SegmentLog::open_sized(d.path(), true, SMALL, &mut |_, _| Ok(()))
        .err()
        .unwrap();
    assert!(err.to_string().contains("newer"), "{err}");
}

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<usize>),
    Truncate(u64),
    Purge(u64),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => proptest::collection::vec(prop_oneof![0usize..200, 1000usize..5000], 1..6).prop_map(Op::Append),
        1 => (0u64..30).prop_map(Op::Truncate),
        1 => (0u64..30).prop_map(Op::Purge),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// Any sequence of appends, truncations (each followed by an append, as Raft
    /// does), purges and reopenings reads back exactly the records a model keeps.
    #[test]
    fn the_log_matches_a_model(ops in proptest::collection::vec(op(), 1..40)) {
        let d = tempfile::tempdir().unwrap();
        let (mut log, ..) = open(d.path());
        let mut model: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut purged = 0u64;
        let mut next = 1u64;
        let mut must_append = false;
        for op in ops {
            match op {
                Op::Append(lens) => {
                    append(&mut log, next, &lens);
                    for (i, &l) in lens.iter().enumerate() {
                        model.insert(next + i as u64, payload(next + i as u64, l));
                    }
                    next += lens.len() as u64;
                    must_append = false;
                }
                Op::Truncate(to) => {
                    let to = to.max(purged + 1);
                    if to < next {
                        log.truncate(to).unwrap();
                        model.retain(|&i, _| i < to);
                        next = to;
                        must_append = true;
                    }
                }
                Op::Purge(to) => {
                    if to >= purged && to < next && !must_append {
                        log.purge(to).unwrap();
                        model.retain(|&i, _| i > to);
                        purged = to;
                    }
                }
                Op::Reopen => {
                    if must_append {
                        continue; // a truncation alone may come back (see the module docs)
                    }
                    drop(log);
                    let (l, first, locs) = open(d.path());
                    log = l;
                    let got: BTreeMap<u64, Vec<u8>> = locs
                        .iter()
                        .enumerate()
                        .map(|(i, l)| (first + i as u64, l.read().unwrap()))
                        .filter(|(i, _)| *i > purged)
                        .collect();
                    prop_assert_eq!(&got, &model);
                    if !model.is_empty() {
                        prop_assert_eq!(log.next_index(), next);
                    }
                }
            }
        }
    }
}

/// A log dropped while its next segment is being prepared waits for it: a log opened
/// again at once on the same directory never shares a file with that preparation.
#[test]
fn dropping_the_log_waits_for_the_next_segment() {
    let d = tempfile::tempdir().unwrap();
    let (mut log, ..) =
        SegmentLog::open_sized(d.path(), false, 64 << 20, &mut |_, _| Ok(())).unwrap();
    append(&mut log, 1, &[100]);
    if let Some(h) = log.spare.take() {
        h.join().unwrap().unwrap();
    }
    let _ = fs::remove_file(d.path().join(SPARE));
    // A preparation of some MiB, fsynced, under way as the log is dropped.
    log.prepare_spare();
    drop(log);
    let spare = fs::metadata(d.path().join(SPARE))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(
        spare > 0,
        "the next segment was still being prepared after the drop"
    );
    let leftovers: Vec<_> = fs::read_dir(d.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(read_back(d.path()), vec![(1, payload(1, 100))]);
}
