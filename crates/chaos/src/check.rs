//! The verdict on a history: no acknowledged write lost, every key's history
//! linearizable, no damaged bytes.
//!
//! # Linearizability
//!
//! Each key is an object of its own (a register that may be absent), and a history
//! is linearizable exactly when each key's is (locality), so keys are checked one
//! by one. A LIST is split into one "is the key there" read per key under its
//! prefix: each key's answer must fit that key's order. (This does not check that
//! one LIST saw all keys at a single instant.)
//!
//! The search is Wing and Gong's, with Lowe's memo of (operations linearized, state)
//! pairs already explored: walk the events in time order; at a call, try to
//! linearize that operation now (the model must allow its answer) and restart from
//! the first event left; at a return whose operation was not linearized yet, undo
//! the last choice. An operation without an answer (timed out, server error) has
//! no return: it may take effect at any point after its call, or never; its
//! answer is not known, so the model accepts any.
//!
//! Unanswered operations make the search exponential in their number (each may be
//! linearized anywhere after its call, or never). So a value that no read returned
//! is replaced by one stand-in (which of them the key holds cannot matter), and
//! unanswered operations that are then alike ("twins": a PUT of the stand-in, a
//! DELETE) are remembered by count, not by name; a configuration is not explored
//! again with more of them linearized (they need never be). Twins are kept out of
//! the event list and tried only where the search would otherwise undo a choice.
//! The operations linearized are remembered as a 128-bit Zobrist hash, so a
//! configuration of a long history costs a few bytes.
//!
//! A history that passes is checked in about linear time. One that fails must have
//! every order of what came before its failure explored: on a long history with
//! many unanswered writes that can exceed the budget, and the key is reported
//! undecided (which fails the run as a violation does).
//!
//! A failing key is reported with a small failing sub-history: the shortest failing
//! prefix (by call time) found by bisection, then every operation whose removal
//! keeps it failing removed, first in chunks, then one by one (but not the write of
//! a value a kept read returned: without it the read fails for want of any write).

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::history::{Call, History, Op, Outcome};

/// How much searching one key's history may take before it is reported undecided.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_steps: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_steps: 20_000_000,
        }
    }
}

/// What a key's operation does, as the model sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// A PUT (answered or not): the key holds `v` after it.
    Put(u64),
    /// A conditional PUT that succeeded: the key was absent.
    PutIfAbsent(u64),
    /// A conditional PUT refused: the key held an object.
    PutIfAbsentRefused,
    /// A conditional PUT without an answer: puts `v` if the key was absent.
    PutIfAbsentUnknown(u64),
    /// A DELETE (answered or not).
    Delete,
    /// A GET that returned this.
    Read(Option<u64>),
    /// A LIST that did or did not show the key.
    Listed(bool),
    /// An answer the call cannot have (a 412 to a plain PUT, say).
    Impossible,
}

/// The model: the state after `s` from `state`, or `None` if `s`'s answer is not
/// possible in `state`.
fn apply(state: Option<u64>, s: Step) -> Option<Option<u64>> {
    match s {
        Step::Put(v) => Some(Some(v)),
        Step::PutIfAbsent(v) => state.is_none().then_some(Some(v)),
        Step::PutIfAbsentRefused => state.is_some().then_some(state),
        Step::PutIfAbsentUnknown(v) => Some(state.or(Some(v))),
        Step::Delete => Some(None),
        Step::Read(r) => (r == state).then_some(state),
        Step::Listed(there) => (there == state.is_some()).then_some(state),
        Step::Impossible => None,
    }
}

/// One operation of one key.
#[derive(Debug, Clone, Copy)]
struct KeyOp {
    /// Index of the operation in the history.
    op: usize,
    step: Step,
    call: u64,
    /// `None`: no answer; it may take effect any time after its call, or never.
    ret: Option<u64>,
}

/// The result of searching one key's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Search {
    Linearizable,
    Violation,
    /// The search took more than its budget.
    Undecided,
}

/// A key whose history is not linearizable.
#[derive(Debug, Clone)]
pub struct Violation {
    pub key: String,
    /// A small failing sub-history of the key, in call order.
    pub ops: Vec<Op>,
}

/// An acknowledged write whose value is not the key's at the end, with no later
/// or concurrent write or delete to explain it.
#[derive(Debug, Clone)]
pub struct Lost {
    pub key: String,
    pub write: Op,
    /// What the last read of the key found.
    pub found: Option<u64>,
}

/// Everything the checker found.
#[derive(Debug, Clone, Default)]
pub struct Verdict {
    pub keys: usize,
    /// Operations that entered the search (LISTs count once per key they cover).
    pub checked: usize,
    pub violations: Vec<Violation>,
    pub lost: Vec<Lost>,
    /// GETs that returned bytes of no value.
    pub corrupt: Vec<Op>,
    /// LISTs that named a key no client used.
    pub phantom: Vec<(Op, String)>,
    /// Keys whose search took more than the budget.
    pub undecided: Vec<String>,
    /// Keys without a read after their last acknowledged write (so their losses
    /// cannot be judged).
    pub unread: Vec<String>,
}

impl Verdict {
    /// Nothing lost, nothing damaged, every key linearizable and decided.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
            && self.lost.is_empty()
            && self.corrupt.is_empty()
            && self.phantom.is_empty()
            && self.undecided.is_empty()
    }
}

/// Checks a whole history.
pub fn check(h: &History, limits: Limits) -> Verdict {
    let mut v = Verdict {
        keys: h.header.keys.len(),
        ..Verdict::default()
    };
    let mut per_key: BTreeMap<&str, Vec<KeyOp>> = h
        .header
        .keys
        .iter()
        .map(|k| (k.as_str(), Vec::new()))
        .collect();
    for (i, op) in h.ops.iter().enumerate() {
        match (&op.call, &op.outcome) {
            (_, Outcome::Corrupt { .. }) => v.corrupt.push(op.clone()),
            (Call::List, Outcome::Listed { keys }) => {
                for k in keys {
                    if !per_key.contains_key(k.as_str()) {
                        v.phantom.push((op.clone(), k.clone()));
                    }
                }
                for (k, ops) in per_key.iter_mut() {
                    if k.starts_with(op.key.as_str()) {
                        ops.push(KeyOp {
                            op: i,
                            step: Step::Listed(keys.iter().any(|x| x == k)),
                            call: op.invoked_us,
                            ret: Some(op.completed_us),
                        });
                    }
                }
            }
            _ => {
                if let Some(step) = step_of(op) {
                    let ops = per_key.entry(op.key.as_str()).or_default();
                    ops.push(KeyOp {
                        op: i,
                        step,
                        call: op.invoked_us,
                        ret: (!op.is_unknown()).then_some(op.completed_us),
                    });
                }
            }
        }
    }
    for (key, ops) in &per_key {
        v.checked += ops.len();
        match search(ops, limits) {
            Search::Linearizable => {}
            Search::Undecided => v.undecided.push(key.to_string()),
            Search::Violation => {
                let small = shrink(ops, limits);
                let mut ops: Vec<Op> = small.iter().map(|k| h.ops[k.op].clone()).collect();
                ops.sort_by_key(|o| (o.invoked_us, o.id));
                ops.dedup_by_key(|o| o.id);
                v.violations.push(Violation {
                    key: key.to_string(),
                    ops,
                });
            }
        }
        lost_writes(h, key, &mut v);
    }
    v
}

/// The model's view of an op on one key; `None` for one that says nothing about
/// the key (refused, or a read without an answer).
fn step_of(op: &Op) -> Option<Step> {
    use Outcome as O;
    Some(match (&op.call, &op.outcome) {
        (_, O::Refused { .. }) => return None,
        (Call::Put { value }, O::Ok | O::Unknown { .. }) => Step::Put(*value),
        (Call::PutIfAbsent { value }, O::Ok) => Step::PutIfAbsent(*value),
        (Call::PutIfAbsent { .. }, O::PreconditionFailed) => Step::PutIfAbsentRefused,
        (Call::PutIfAbsent { value }, O::Unknown { .. }) => Step::PutIfAbsentUnknown(*value),
        (Call::Delete, O::Ok | O::Unknown { .. }) => Step::Delete,
        (Call::Get, O::Found { value }) => Step::Read(Some(*value)),
        (Call::Get, O::NotFound) => Step::Read(None),
        // An answer this call cannot have (a 412 to a plain PUT, say) is a
        // read of nothing possible: the search rejects it.
        (Call::Put { .. } | Call::PutIfAbsent { .. } | Call::Delete, _) => Step::Impossible,
        (Call::Get | Call::List, _) => return None,
    })
}

/// The events of one key's operations as a doubly linked list, from which
/// linearized operations are taken out and put back (in reverse order).
struct Events {
    /// (time, is a return, op index), in time order; at equal times calls come
    /// first (such ops overlap). List position `p` is event `p - 1`; 0 is the head.
    events: Vec<(u64, bool, usize)>,
    next: Vec<usize>,
    prev: Vec<usize>,
    call_at: Vec<usize>,
    ret_at: Vec<Option<usize>>,
}

impl Events {
    /// The events of the ops for which `listed` holds.
    fn new(ops: &[KeyOp], listed: impl Fn(usize) -> bool) -> Events {
        let n = ops.len();
        let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * n);
        for (i, o) in ops.iter().enumerate().filter(|&(i, _)| listed(i)) {
            events.push((o.call, false, i));
            if let Some(r) = o.ret {
                events.push((r.max(o.call), true, i));
            }
        }
        events.sort_unstable();
        let len = events.len() + 1;
        let mut call_at = vec![0usize; n];
        let mut ret_at = vec![None; n];
        for (pos, &(_, is_ret, i)) in events.iter().enumerate() {
            if is_ret {
                ret_at[i] = Some(pos + 1);
            } else {
                call_at[i] = pos + 1;
            }
        }
        Events {
            events,
            next: (1..=len).collect(),
            prev: (0..len).map(|p| p.saturating_sub(1)).collect(),
            call_at,
            ret_at,
        }
    }

    /// The position past the last event.
    fn end(&self) -> usize {
        self.events.len() + 1
    }

    fn unlink(&mut self, at: usize) {
        let (p, nx) = (self.prev[at], self.next[at]);
        self.next[p] = nx;
        if nx != self.end() {
            self.prev[nx] = p;
        }
    }

    fn relink(&mut self, at: usize) {
        let (p, nx) = (self.prev[at], self.next[at]);
        self.next[p] = at;
        if nx != self.end() {
            self.prev[nx] = at;
        }
    }

    /// Takes op `i` out (its call and its return).
    fn lift(&mut self, i: usize) {
        self.unlink(self.call_at[i]);
        if let Some(r) = self.ret_at[i] {
            self.unlink(r);
        }
    }

    /// Puts op `i` back; returns the position after its call.
    fn unlift(&mut self, i: usize) -> usize {
        if let Some(r) = self.ret_at[i] {
            self.relink(r);
        }
        self.relink(self.call_at[i]);
        self.next[self.call_at[i]]
    }
}

/// A value no read returned: which of them a key holds cannot matter, so the
/// model holds this one in their place.
const UNSEEN: u64 = u64::MAX;

/// Unanswered operations that nothing distinguishes once called: the search
/// remembers how many of each kind it has linearized, not which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Twin {
    Put,
    PutIfAbsent,
    Delete,
}

/// `ops` as the search sees them: values no read returned become [`UNSEEN`]; and
/// which unanswered ops are interchangeable.
fn canonical(ops: &[KeyOp]) -> (Vec<KeyOp>, Vec<Option<Twin>>) {
    let seen: HashSet<u64> = ops
        .iter()
        .filter_map(|o| match o.step {
            Step::Read(Some(v)) => Some(v),
            _ => None,
        })
        .collect();
    let hide = |v: u64| if seen.contains(&v) { v } else { UNSEEN };
    let mut out = Vec::with_capacity(ops.len());
    let mut twins = Vec::with_capacity(ops.len());
    for o in ops {
        let step = match o.step {
            Step::Put(v) => Step::Put(hide(v)),
            Step::PutIfAbsent(v) => Step::PutIfAbsent(hide(v)),
            Step::PutIfAbsentUnknown(v) => Step::PutIfAbsentUnknown(hide(v)),
            s => s,
        };
        let twin = match (o.ret, step) {
            (None, Step::Put(UNSEEN)) => Some(Twin::Put),
            (None, Step::PutIfAbsentUnknown(UNSEEN)) => Some(Twin::PutIfAbsent),
            (None, Step::Delete) => Some(Twin::Delete),
            _ => None,
        };
        out.push(KeyOp { step, ..*o });
        twins.push(twin);
    }
    (out, twins)
}

/// Ops linearized (twins aside, as a Zobrist hash: the XOR of a random 128-bit
/// key per op, so that a long history's configurations take a few bytes each) and
/// the state they leave.
type Config = (u128, Option<u64>);

/// The Zobrist key of op `i`: 128 bits from splitmix64.
fn zobrist(i: usize) -> u128 {
    let mix = |mut x: u64| {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    };
    let a = mix(i as u64);
    (u128::from(a) << 64) | u128::from(mix(a ^ 0x5851_f42d_4c95_7f2d))
}

/// A choice the search made, undone when it backtracks.
#[derive(Debug, Clone, Copy)]
enum Choice {
    /// Op `i` (not a twin) linearized.
    Op(usize),
    /// One twin of this kind linearized, at list position `at` (a return, or the
    /// end).
    Twin(Twin, usize),
}

/// Wing–Gong–Lowe search over one key's operations.
///
/// Twins are not in the event list (thousands of them would be walked past at
/// every step): at a return, where the search would otherwise undo its last
/// choice, it first tries one twin of each kind, if one was called by then and not
/// yet used.
fn search(ops: &[KeyOp], limits: Limits) -> Search {
    let (ops, twins) = canonical(ops);
    let mut ev = Events::new(&ops, |i| twins[i].is_none());
    let end = ev.end();
    // Call times of the twins of each kind, sorted.
    let mut twin_calls: [Vec<u64>; 3] = Default::default();
    for (o, t) in ops.iter().zip(&twins) {
        if let Some(t) = t {
            twin_calls[*t as usize].push(o.call);
        }
    }
    for c in &mut twin_calls {
        c.sort_unstable();
    }
    const KINDS: [Twin; 3] = [Twin::Put, Twin::PutIfAbsent, Twin::Delete];
    let twin_step = |t: Twin| match t {
        Twin::Put => Step::Put(UNSEEN),
        Twin::PutIfAbsent => Step::PutIfAbsentUnknown(UNSEEN),
        Twin::Delete => Step::Delete,
    };
    let mut remaining = ops.iter().filter(|o| o.ret.is_some()).count();
    // Ops linearized, except twins: those are counted by kind.
    let keys: Vec<u128> = (0..ops.len()).map(zobrist).collect();
    let mut done = 0u128;
    let mut counts = [0u32; 3];
    // Configurations explored. One with fewer twins linearized (and otherwise
    // the same) can do all another can: twins need never be linearized at all.
    let mut seen: HashMap<Config, Vec<[u32; 3]>> = HashMap::new();
    let mut first_visit = |done: u128, counts: [u32; 3], state: Option<u64>| {
        let known = seen.entry((done, state)).or_default();
        if known
            .iter()
            .any(|k| k.iter().zip(&counts).all(|(a, b)| a <= b))
        {
            return false;
        }
        known.push(counts);
        true
    };
    // Each choice, with the state before it and the twin kinds tried before it
    // at its position.
    let mut stack: Vec<(Choice, Option<u64>, u8)> = Vec::new();
    let mut state: Option<u64> = None;
    let mut tried = 0u8;
    let mut at = ev.next[0];
    let mut steps = 0u64;
    while remaining > 0 {
        steps += 1;
        if steps > limits.max_steps {
            return Search::Undecided;
        }
        let at_return = at == end || ev.events[at - 1].1;
        if at_return {
            // Before giving up this configuration: a twin called by now?
            let now = if at == end {
                u64::MAX
            } else {
                ev.events[at - 1].0
            };
            let mut moved = false;
            for t in KINDS {
                let b = 1u8 << t as u8;
                if tried & b != 0 {
                    continue;
                }
                tried |= b;
                let k = t as usize;
                let called = twin_calls[k].partition_point(|&c| c <= now) as u32;
                if called <= counts[k] {
                    continue;
                }
                if let Some(after) = apply(state, twin_step(t)) {
                    counts[k] += 1;
                    if first_visit(done, counts, after) {
                        stack.push((Choice::Twin(t, at), state, tried));
                        state = after;
                        tried = 0;
                        at = ev.next[0];
                        moved = true;
                        break;
                    }
                    counts[k] -= 1;
                }
            }
            if moved {
                continue;
            }
            // An op that had to be linearized by now was not: undo the last choice.
            let Some((choice, before, was_tried)) = stack.pop() else {
                return Search::Violation;
            };
            state = before;
            tried = was_tried;
            match choice {
                Choice::Op(i) => {
                    done ^= keys[i];
                    if ops[i].ret.is_some() {
                        remaining += 1;
                    }
                    at = ev.unlift(i);
                }
                Choice::Twin(t, pos) => {
                    counts[t as usize] -= 1;
                    at = pos;
                }
            }
            continue;
        }
        let i = ev.events[at - 1].2;
        if let Some(after) = apply(state, ops[i].step) {
            done ^= keys[i];
            if first_visit(done, counts, after) {
                stack.push((Choice::Op(i), state, tried));
                state = after;
                tried = 0;
                ev.lift(i);
                if ops[i].ret.is_some() {
                    remaining -= 1;
                }
                at = ev.next[0];
                continue;
            }
            done ^= keys[i];
        }
        at = ev.next[at];
    }
    Search::Linearizable
}

/// How long shrinking a failing key's history may take; past it, the smallest
/// failing history found so far is reported.
const SHRINK_TIME: std::time::Duration = std::time::Duration::from_secs(20);

/// The shortest failing prefix of `ops` by call time (found by bisection), then
/// with every op removed whose removal keeps it failing: first in chunks, then one
/// by one, until nothing more can go.
fn shrink(ops: &[KeyOp], limits: Limits) -> Vec<KeyOp> {
    let started = std::time::Instant::now();
    let mut sorted: Vec<KeyOp> = ops.to_vec();
    sorted.sort_by_key(|o| (o.call, o.op));
    let fails = |s: &[KeyOp]| search(s, limits) == Search::Violation;
    // Bisection for a short failing prefix (the whole list fails).
    let (mut lo, mut hi) = (0usize, sorted.len());
    while lo + 1 < hi {
        let mid = (lo + hi) / 2;
        if fails(&sorted[..mid]) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    let mut cur: Vec<KeyOp> = sorted[..hi].to_vec();
    // A write whose value a kept read returned stays: without it the read would
    // fail for want of any write, which says nothing.
    let needed = |cur: &[KeyOp], o: &KeyOp| match o.step {
        Step::Put(v) | Step::PutIfAbsent(v) | Step::PutIfAbsentUnknown(v) => {
            cur.iter().any(|r| r.step == Step::Read(Some(v)))
        }
        _ => false,
    };
    let mut chunk = cur.len().div_ceil(2).max(1);
    loop {
        let before = cur.len();
        let mut at = 0;
        while at < cur.len() {
            if started.elapsed() > SHRINK_TIME {
                return cur;
            }
            let upto = (at + chunk).min(cur.len());
            let without: Vec<KeyOp> = cur
                .iter()
                .enumerate()
                .filter(|&(j, o)| !(at..upto).contains(&j) || needed(&cur, o))
                .map(|(_, o)| *o)
                .collect();
            if without.len() < cur.len() && fails(&without) {
                cur = without;
            } else {
                at = upto;
            }
        }
        // Removing a read may free its write: go again at the finest grain until
        // a pass removes nothing.
        if chunk == 1 && cur.len() == before {
            return cur;
        }
        chunk = (chunk / 2).max(1);
    }
}

/// Acknowledged writes of `key` that the last read does not show and nothing
/// after them explains.
fn lost_writes(h: &History, key: &str, v: &mut Verdict) {
    let ops: Vec<&Op> = h.ops.iter().filter(|o| o.key == key).collect();
    let acked = |o: &&Op| {
        o.is_write() && matches!(o.outcome, Outcome::Ok) && !matches!(o.call, Call::Delete)
    };
    let Some(last_write_end) = ops
        .iter()
        .filter(|o| o.is_write() && !o.is_unknown())
        .map(|o| o.completed_us)
        .max()
    else {
        return;
    };
    let last_read = ops
        .iter()
        .filter(|o| matches!(o.call, Call::Get) && o.invoked_us > last_write_end)
        .filter(|o| matches!(o.outcome, Outcome::Found { .. } | Outcome::NotFound))
        .max_by_key(|o| o.invoked_us);
    let Some(read) = last_read else {
        if ops.iter().any(&acked) {
            v.unread.push(key.to_string());
        }
        return;
    };
    let found = match read.outcome {
        Outcome::Found { value } => Some(value),
        _ => None,
    };
    for w in ops.iter().filter(|o| acked(o)) {
        let value = match w.call {
            Call::Put { value } | Call::PutIfAbsent { value } => value,
            _ => continue,
        };
        if found == Some(value) {
            continue;
        }
        // Another write or delete that may come after `w` explains it.
        let explained = ops.iter().any(|o| {
            o.id != w.id
                && o.is_write()
                && matches!(o.outcome, Outcome::Ok | Outcome::Unknown { .. })
                && (o.is_unknown() || o.completed_us >= w.invoked_us)
        });
        if !explained {
            v.lost.push(Lost {
                key: key.to_string(),
                write: (*w).clone(),
                found,
            });
        }
    }
}
