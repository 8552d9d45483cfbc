//! The checker accepts what a correct store may answer and rejects what it may not.

use cairn_chaos::{Call, Header, History, Limits, Op, Outcome, check};
use proptest::prelude::*;

fn header(keys: &[&str]) -> Header {
    Header {
        format: cairn_chaos::history::FORMAT,
        bucket: "b".into(),
        keys: keys.iter().map(|k| k.to_string()).collect(),
        run: serde_json::Value::Null,
    }
}

/// Builds histories: `op(key, call, from, to, outcome)`.
struct H {
    ops: Vec<Op>,
}

impl H {
    fn new() -> H {
        H { ops: Vec::new() }
    }
    fn op(mut self, key: &str, call: Call, from: u64, to: u64, outcome: Outcome) -> H {
        let id = self.ops.len() as u64;
        self.ops.push(Op {
            id,
            client: id as u32,
            node: 0,
            key: key.into(),
            call,
            invoked_us: from,
            completed_us: to,
            outcome,
        });
        self
    }
    fn put(self, key: &str, v: u64, from: u64, to: u64) -> H {
        self.op(key, Call::Put { value: v }, from, to, Outcome::Ok)
    }
    fn get(self, key: &str, found: Option<u64>, from: u64, to: u64) -> H {
        let out = match found {
            Some(value) => Outcome::Found { value },
            None => Outcome::NotFound,
        };
        self.op(key, Call::Get, from, to, out)
    }
    fn history(self, keys: &[&str]) -> History {
        History {
            header: header(keys),
            ops: self.ops,
        }
    }
}

fn unknown() -> Outcome {
    Outcome::Unknown {
        error: "timed out".into(),
    }
}

#[test]
fn a_sequential_history_of_every_kind_passes() {
    let h = H::new()
        .get("k", None, 0, 1)
        .put("k", 1, 2, 3)
        .get("k", Some(1), 4, 5)
        .op(
            "k",
            Call::PutIfAbsent { value: 2 },
            6,
            7,
            Outcome::PreconditionFailed,
        )
        .op(
            "",
            Call::List,
            8,
            9,
            Outcome::Listed {
                keys: vec!["k".into()],
            },
        )
        .op("k", Call::Delete, 10, 11, Outcome::Ok)
        .op("", Call::List, 12, 13, Outcome::Listed { keys: vec![] })
        .op("k", Call::PutIfAbsent { value: 3 }, 14, 15, Outcome::Ok)
        .get("k", Some(3), 16, 17)
        .op(
            "k",
            Call::Put { value: 9 },
            18,
            19,
            Outcome::Refused {
                status: 403,
                code: "RequestTimeTooSkewed".into(),
            },
        )
        .get("k", Some(3), 20, 21)
        .history(&["k"]);
    let v = check(&h, Limits::default());
    assert!(v.passed(), "{v:?}");
    assert_eq!(v.checked, 10);
}

#[test]
fn a_stale_read_is_rejected() {
    let h = H::new()
        .put("k", 1, 0, 10)
        .put("k", 2, 20, 30)
        .get("k", Some(1), 40, 50)
        .history(&["k"]);
    let v = check(&h, Limits::default());
    assert!(!v.passed());
    assert_eq!(v.violations.len(), 1);
    let ids: Vec<u64> = v.violations[0].ops.iter().map(|o| o.id).collect();
    assert_eq!(ids, vec![0, 1, 2], "the smallest failing sub-history");
}

#[test]
fn a_lost_write_is_rejected_and_named() {
    let h = H::new()
        .put("k", 1, 0, 10)
        .put("j", 5, 0, 10)
        .get("k", None, 100, 110)
        .get("j", Some(5), 100, 110)
        .history(&["k", "j"]);
    let v = check(&h, Limits::default());
    assert!(!v.passed());
    assert_eq!(v.lost.len(), 1);
    assert_eq!(v.lost[0].key, "k");
    assert_eq!(v.lost[0].write.id, 0);
    assert_eq!(v.violations.len(), 1);
    assert_eq!(v.violations[0].key, "k");
}

#[test]
fn a_later_overwrite_or_delete_explains_a_missing_value() {
    // Acknowledged 1, then an unanswered delete: the final absence is explained.
    let h = H::new()
        .put("k", 1, 0, 10)
        .op("k", Call::Delete, 20, 5000, unknown())
        .get("k", None, 6000, 6010)
        .history(&["k"]);
    let v = check(&h, Limits::default());
    assert!(v.passed(), "{v:?}");
    // Two concurrent acknowledged PUTs: either may be the last.
    let h = H::new()
        .put("k", 1, 0, 100)
        .put("k", 2, 10, 90)
        .get("k", Some(1), 200, 210)
        .history(&["k"]);
    assert!(check(&h, Limits::default()).passed());
}

#[test]
fn a_conditional_put_that_succeeds_twice_is_rejected() {
    // One after the other, nothing deleted between.
    let h = H::new()
        .op("k", Call::PutIfAbsent { value: 1 }, 0, 10, Outcome::Ok)
        .op("k", Call::PutIfAbsent { value: 2 }, 20, 30, Outcome::Ok)
        .history(&["k"]);
    assert_eq!(check(&h, Limits::default()).violations.len(), 1);
    // Concurrent: still only one may win.
    let h = H::new()
        .op("k", Call::PutIfAbsent { value: 1 }, 0, 30, Outcome::Ok)
        .op("k", Call::PutIfAbsent { value: 2 }, 10, 40, Outcome::Ok)
        .history(&["k"]);
    assert_eq!(check(&h, Limits::default()).violations.len(), 1);
    // With a delete that may fall between them, both may win.
    let h = H::new()
        .op("k", Call::PutIfAbsent { value: 1 }, 0, 10, Outcome::Ok)
        .op("k", Call::Delete, 5, 25, Outcome::Ok)
        .op("k", Call::PutIfAbsent { value: 2 }, 20, 30, Outcome::Ok)
        .history(&["k"]);
    assert!(check(&h, Limits::default()).passed());
}

#[test]
fn a_value_that_comes_and_goes_is_rejected() {
    // A PUT in flight may be seen early, but once seen it stays.
    let ok = H::new()
        .put("k", 1, 0, 100)
        .get("k", None, 10, 20)
        .get("k", Some(1), 30, 40)
        .get("k", Some(1), 50, 60)
        .history(&["k"]);
    assert!(check(&ok, Limits::default()).passed());
    let bad = H::new()
        .put("k", 1, 0, 100)
        .get("k", None, 10, 20)
        .get("k", Some(1), 30, 40)
        .get("k", None, 50, 60)
        .history(&["k"]);
    assert_eq!(check(&bad, Limits::default()).violations.len(), 1);
}

#[test]
fn an_unanswered_write_may_land_late_or_never_but_not_undo_itself() {
    let never = H::new()
        .op("k", Call::Put { value: 1 }, 0, 50, unknown())
        .get("k", None, 60, 70)
        .get("k", None, 1000, 1010)
        .history(&["k"]);
    assert!(check(&never, Limits::default()).passed());
    let late = H::new()
        .op("k", Call::Put { value: 1 }, 0, 50, unknown())
        .get("k", None, 60, 70)
        .get("k", Some(1), 1000, 1010)
        .history(&["k"]);
    assert!(check(&late, Limits::default()).passed());
    let flip = H::new()
        .op("k", Call::Put { value: 1 }, 0, 50, unknown())
        .get("k", Some(1), 60, 70)
        .get("k", None, 1000, 1010)
        .history(&["k"]);
    assert_eq!(check(&flip, Limits::default()).violations.len(), 1);
    // A read before the write was sent cannot see it.
    let early = H::new()
        .get("k", Some(1), 0, 10)
        .op("k", Call::Put { value: 1 }, 20, 50, unknown())
        .history(&["k"]);
    assert_eq!(check(&early, Limits::default()).violations.len(), 1);
}

#[test]
fn lists_must_agree_with_each_key_and_name_no_stranger() {
    let missing = H::new()
        .put("a/1", 1, 0, 10)
        .op("a/", Call::List, 20, 30, Outcome::Listed { keys: vec![] })
        .history(&["a/1", "b/1"]);
    let v = check(&missing, Limits::default());
    assert_eq!(v.violations.len(), 1);
    assert_eq!(v.violations[0].key, "a/1");
    // A LIST of another prefix says nothing about the key.
    let other = H::new()
        .put("a/1", 1, 0, 10)
        .op("b/", Call::List, 20, 30, Outcome::Listed { keys: vec![] })
        .history(&["a/1", "b/1"]);
    assert!(check(&other, Limits::default()).passed());
    let phantom = H::new()
        .op(
            "",
            Call::List,
            20,
            30,
            Outcome::Listed {
                keys: vec!["zz".into()],
            },
        )
        .history(&["a/1"]);
    let v = check(&phantom, Limits::default());
    assert!(!v.passed());
    assert_eq!(v.phantom.len(), 1);
}

#[test]
fn damaged_bytes_fail_the_run() {
    let h = H::new()
        .put("k", 1, 0, 10)
        .op(
            "k",
            Call::Get,
            20,
            30,
            Outcome::Corrupt {
                detail: "bytes of value 1 differ from offset 9".into(),
            },
        )
        .history(&["k"]);
    let v = check(&h, Limits::default());
    assert!(!v.passed());
    assert_eq!(v.corrupt.len(), 1);
}

#[test]
fn a_search_over_budget_is_undecided_not_passed() {
    // Many overlapping writes and reads: more than a handful of steps.
    let mut h = H::new();
    for i in 0..12u64 {
        h = h.put("k", i, 0, 1000);
    }
    h = h.get("k", Some(99), 2000, 2010);
    let v = check(&h.history(&["k"]), Limits { max_steps: 10 });
    assert_eq!(v.undecided, vec!["k".to_string()]);
    assert!(!v.passed());
}

#[test]
fn a_long_history_with_one_stale_read_shrinks_to_a_few_ops() {
    let mut h = H::new();
    let mut t = 0;
    for i in 0..300u64 {
        h = h.put("k", i, t, t + 5).get("k", Some(i), t + 6, t + 9);
        t += 10;
    }
    // Value 150 read long after 299 was written.
    h = h.get("k", Some(150), t + 10, t + 20);
    for i in 300..400u64 {
        t += 30;
        h = h.put("k", i, t, t + 5);
    }
    let v = check(&h.history(&["k"]), Limits::default());
    assert_eq!(v.violations.len(), 1);
    let small = &v.violations[0].ops;
    assert!(small.len() <= 3, "{small:?}");
    assert!(
        small
            .iter()
            .any(|o| o.outcome == Outcome::Found { value: 150 })
    );
}

/// A history a linearizable register produces: each op takes effect at a point
/// within its interval (an unanswered one at a point after its call, or never).
fn linearizable_history(spec: Vec<(u8, u64, u64, u64, bool)>) -> History {
    struct Planned {
        call: Call,
        from: u64,
        to: u64,
        point: u64,
        unknown: bool,
        applied: bool,
    }
    let mut plan: Vec<Planned> = Vec::new();
    for (n, (kind, from, len, at, unknown)) in spec.into_iter().enumerate() {
        let to = from + len;
        let point = from * 1000 + (at % (len * 1000 + 1)) + n as u64 % 7;
        let call = match kind % 5 {
            0 => Call::Put { value: n as u64 },
            1 => Call::PutIfAbsent { value: n as u64 },
            2 => Call::Delete,
            3 => Call::Get,
            _ => Call::List,
        };
        let unknown = unknown && !matches!(call, Call::Get | Call::List);
        plan.push(Planned {
            call,
            from: from * 1000,
            to: to * 1000 + 999,
            point,
            unknown,
            applied: !unknown || at % 2 == 0,
        });
    }
    let mut order: Vec<usize> = (0..plan.len()).collect();
    order.sort_by_key(|&i| (plan[i].point, i));
    let mut state: Option<u64> = None;
    let mut outcomes = vec![Outcome::Ok; plan.len()];
    for i in order {
        let p = &plan[i];
        if !p.applied {
            outcomes[i] = unknown();
            continue;
        }
        outcomes[i] = match p.call {
            Call::Put { value } => {
                state = Some(value);
                Outcome::Ok
            }
            Call::PutIfAbsent { value } => {
                if state.is_none() {
                    state = Some(value);
                    Outcome::Ok
                } else {
                    Outcome::PreconditionFailed
                }
            }
            Call::Delete => {
                state = None;
                Outcome::Ok
            }
            Call::Get => match state {
                Some(value) => Outcome::Found { value },
                None => Outcome::NotFound,
            },
            Call::List => Outcome::Listed {
                keys: state.iter().map(|_| "k".to_string()).collect(),
            },
        };
        if p.unknown {
            outcomes[i] = unknown();
        }
    }
    let mut h = H::new();
    for (p, out) in plan.into_iter().zip(outcomes) {
        let key = if matches!(p.call, Call::List) {
            ""
        } else {
            "k"
        };
        h = h.op(key, p.call, p.from, p.to, out);
    }
    h.history(&["k"])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Whatever a linearizable register answers, the checker accepts.
    #[test]
    fn every_linearizable_history_passes(
        spec in proptest::collection::vec((0u8..5, 0u64..40, 0u64..6, any::<u64>(), any::<bool>()), 0..40)
    ) {
        let h = linearizable_history(spec);
        let v = check(&h, Limits::default());
        prop_assert!(v.violations.is_empty() && v.undecided.is_empty(), "{:?}\n{:?}", v, h.ops);
    }

    /// A read of a value nobody wrote is always caught.
    #[test]
    fn a_read_of_an_unwritten_value_is_caught(
        spec in proptest::collection::vec((0u8..5, 0u64..40, 0u64..6, any::<u64>(), any::<bool>()), 1..40),
        at in any::<prop::sample::Index>(),
    ) {
        let mut h = linearizable_history(spec);
        let t = h.ops[at.index(h.ops.len())].invoked_us;
        let id = h.ops.len() as u64;
        h.ops.push(Op { id, client: 99, node: 0, key: "k".into(), call: Call::Get,
            invoked_us: t, completed_us: t + 5, outcome: Outcome::Found { value: 1_000_000 } });
        let v = check(&h, Limits::default());
        prop_assert_eq!(v.violations.len(), 1);
    }
}

#[test]
fn many_unanswered_writes_stay_cheap_and_do_not_hide_a_violation() {
    // 60 unanswered PUTs and DELETEs over the whole run: the search must not
    // try their 2^60 subsets.
    let mut h = H::new();
    for i in 0..60u64 {
        let call = if i % 3 == 0 {
            Call::Delete
        } else {
            Call::Put { value: 1000 + i }
        };
        h = h.op("k", call, i * 10, i * 10 + 5, unknown());
    }
    let mut t = 1000;
    for i in 0..50u64 {
        h = h.put("k", i, t, t + 5).get("k", Some(i), t + 6, t + 9);
        t += 10;
    }
    let fine = h.history(&["k"]);
    let v = check(
        &fine,
        Limits {
            max_steps: 2_000_000,
        },
    );
    assert!(v.passed(), "{:?}", v.undecided);
    // The same with a read of an overwritten value at the end.
    let mut bad = fine.clone();
    bad.ops.push(Op {
        id: 10_000,
        client: 7,
        node: 0,
        key: "k".into(),
        call: Call::Get,
        invoked_us: t + 100,
        completed_us: t + 110,
        outcome: Outcome::Found { value: 3 },
    });
    let v = check(
        &bad,
        Limits {
            max_steps: 2_000_000,
        },
    );
    assert_eq!(v.violations.len(), 1, "{:?}", v.undecided);
}

#[test]
fn an_answer_the_call_cannot_have_is_rejected() {
    let h = H::new()
        .op(
            "k",
            Call::Put { value: 1 },
            0,
            10,
            Outcome::PreconditionFailed,
        )
        .history(&["k"]);
    assert_eq!(check(&h, Limits::default()).violations.len(), 1);
}

#[test]
fn a_long_history_is_checked_in_bounded_time_and_memory() {
    // 30 000 overlapping operations on one key, a tenth of the writes unanswered:
    // what a half-hour run puts on a key.
    let spec = |n: u64| -> Vec<(u8, u64, u64, u64, bool)> {
        (0..n)
            .map(|i| {
                let x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                (
                    (x >> 7) as u8 % 5,
                    i,
                    1 + (x >> 13) % 3,
                    x >> 17,
                    (x >> 29) % 10 == 0,
                )
            })
            .collect()
    };
    let started = std::time::Instant::now();
    let h = linearizable_history(spec(30_000));
    assert_eq!(h.ops.len(), 30_000);
    assert!(h.ops.iter().filter(|o| o.is_unknown()).count() > 1000);
    let v = check(&h, Limits::default());
    assert!(v.passed(), "{:?}", v.undecided);
    // A read, after everything, of a value long overwritten: the search must
    // exhaust every order of what came before, so a shorter history.
    let mut bad = linearizable_history(spec(600));
    let old = bad
        .ops
        .iter()
        .find_map(|o| match (o.call.clone(), o.outcome.clone()) {
            (Call::Put { value }, Outcome::Ok) => Some(value),
            _ => None,
        })
        .unwrap();
    let end = bad.ops.iter().map(|o| o.completed_us).max().unwrap();
    bad.ops.push(Op {
        id: 1_000_000,
        client: 9,
        node: 0,
        key: "k".into(),
        call: Call::Get,
        invoked_us: end + 10,
        completed_us: end + 20,
        outcome: Outcome::Found { value: old },
    });
    let v = check(&bad, Limits::default());
    assert_eq!(v.violations.len(), 1, "{:?}", v.undecided);
    assert!(v.violations[0].ops.len() <= 5, "{:?}", v.violations[0].ops);
    // A hang guard, not a benchmark: both take a few seconds at most.
    assert!(started.elapsed() < std::time::Duration::from_secs(120));
}
