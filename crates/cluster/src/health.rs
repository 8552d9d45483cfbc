//! Failure detection: every node sends each other node of the layout a heartbeat
//! (a ping over the RPC transport) at a fixed interval, and judges each peer by a
//! phi-accrual detector over the times between the answers it got.
//!
//! Phi is how unlikely it is, given the gaps between heartbeats seen so far, that
//! the next one is merely late: `phi = -log10(P(gap > now - last))`, the gaps
//! modelled as a normal distribution (mean and deviation over a sliding window,
//! the deviation at least `min_std_dev`, the mean raised by `acceptable_pause` so
//! that a short stall such as a GC or an fsync is not taken for a death). Phi 1
//! means a 10 % chance of a wrong verdict, 8 one in 10⁸. A peer is *up* below
//! `suspect_phi`, *suspect* from it, *down* from `down_phi`. Reads and writes try
//! suspect and down nodes last; status and metrics show each peer's state and phi.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// A peer's state as the detector judges it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Health {
    Up,
    Suspect,
    Down,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Up => "up",
            Health::Suspect => "suspect",
            Health::Down => "down",
        }
    }
}

/// Settings of the failure detector.
#[derive(Clone, Debug)]
pub struct HealthSettings {
    /// How often a heartbeat goes to each peer.
    pub interval: Duration,
    /// Phi from which a peer is suspect (tried after the others).
    pub suspect_phi: f64,
    /// Phi from which a peer is down.
    pub down_phi: f64,
    /// A pause this long past the usual gap still counts as normal.
    pub acceptable_pause: Duration,
    /// The least deviation assumed of the gaps (a steady network would otherwise
    /// make any small delay look like a failure).
    pub min_std_dev: Duration,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            interval: Duration::from_millis(500),
            suspect_phi: 3.0,
            down_phi: 8.0,
            acceptable_pause: Duration::from_millis(1000),
            min_std_dev: Duration::from_millis(100),
        }
    }
}

impl HealthSettings {
    /// Checks the settings, naming the bad one.
    pub fn validate(&self) -> Result<(), String> {
        if self.interval < Duration::from_millis(10) || self.interval > Duration::from_secs(60) {
            return Err("heartbeat_interval: must be between 10ms and 60s".into());
        }
        if !(self.suspect_phi.is_finite() && self.suspect_phi > 0.0) {
            return Err("phi_suspect: must be a number above 0".into());
        }
        if !(self.down_phi.is_finite() && self.down_phi >= self.suspect_phi) {
            return Err("phi_down: must be a number at least phi_suspect".into());
        }
        Ok(())
    }
}

/// Gaps between heartbeats kept per peer.
const WINDOW: usize = 100;

/// The phi-accrual detector of one peer.
#[derive(Clone, Debug)]
pub struct PhiDetector {
    /// Gaps between the last heartbeats, in seconds.
    gaps: VecDeque<f64>,
    sum: f64,
    sum_sq: f64,
    last: Instant,
}

impl PhiDetector {
    /// A detector that starts as if a heartbeat had just arrived, after gaps of
    /// `interval` (a peer never heard from turns suspect, then down, as one that
    /// stopped answering would).
    pub fn new(now: Instant, interval: Duration) -> PhiDetector {
        let mut d = PhiDetector {
            gaps: VecDeque::with_capacity(WINDOW),
            sum: 0.0,
            sum_sq: 0.0,
            last: now,
        };
        let g = interval.as_secs_f64();
        // Two gaps: a mean and a (zero) deviation to start from.
        d.push(g);
        d.push(g);
        d
    }

    fn push(&mut self, gap: f64) {
        if self.gaps.len() == WINDOW
            && let Some(old) = self.gaps.pop_front()
        {
            self.sum -= old;
            self.sum_sq -= old * old;
        }
        self.gaps.push_back(gap);
        self.sum += gap;
        self.sum_sq += gap * gap;
    }

    /// A heartbeat arrived at `now`. A gap over three times the mean (an outage,
    /// not the network's rhythm) counts as three times the mean, so that a peer
    /// back from the dead is not judged by its absence for long after.
    pub fn heartbeat(&mut self, now: Instant) {
        let gap = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        let mean = self.sum / self.gaps.len().max(1) as f64;
        self.push(gap.min(mean * 3.0));
    }

    /// When the last heartbeat arrived.
    pub fn last(&self) -> Instant {
        self.last
    }

    /// Phi at `now`, under `settings`.
    pub fn phi(&self, now: Instant, settings: &HealthSettings) -> f64 {
        let n = self.gaps.len().max(1) as f64;
        let mean = self.sum / n;
        let var = (self.sum_sq / n - mean * mean).max(0.0);
        let std = var.sqrt().max(settings.min_std_dev.as_secs_f64());
        let mean = mean + settings.acceptable_pause.as_secs_f64();
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        phi(elapsed, mean, std)
    }
}

/// `-log10` of the probability that a normal variable of `mean` and `std`
/// exceeds `t`, by the logistic approximation of the normal distribution's tail
/// (accurate to about 10⁻⁴, and never infinite where it matters: the result is
/// capped at 100).
pub fn phi(t: f64, mean: f64, std: f64) -> f64 {
    let y = (t - mean) / std;
    let e = (-y * (1.5976 + 0.070566 * y * y)).exp();
    let p = if t > mean {
        e / (1.0 + e)
    } else {
        1.0 - 1.0 / (1.0 + e)
    };
    if p <= 0.0 || !p.is_finite() {
        return 100.0;
    }
    (-p.log10()).clamp(0.0, 100.0)
}

/// One peer's view, as status shows it.
#[derive(Clone, Debug)]
pub struct PeerHealth {
    pub node: u64,
    pub health: Health,
    pub phi: f64,
    /// Since the last heartbeat answered.
    pub silent_for: Duration,
    /// Round trip of the last heartbeat answered.
    pub rtt: Option<Duration>,
}

struct Peer {
    detector: PhiDetector,
    health: Health,
    rtt: Option<Duration>,
    /// A heartbeat is on its way (the next is not sent before it ends).
    in_flight: bool,
}

/// The detectors of every peer.
pub struct Detectors {
    settings: HealthSettings,
    peers: Mutex<HashMap<u64, Peer>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Detectors {
    pub fn new(settings: HealthSettings) -> Detectors {
        Detectors {
            settings,
            peers: Mutex::default(),
        }
    }

    pub fn settings(&self) -> &HealthSettings {
        &self.settings
    }

    /// Keeps detectors for exactly `nodes` (new ones start as just heard from).
    pub fn retain(&self, nodes: &[u64], now: Instant) {
        let mut peers = lock(&self.peers);
        peers.retain(|id, _| nodes.contains(id));
        for &id in nodes {
            peers.entry(id).or_insert_with(|| Peer {
                detector: PhiDetector::new(now, self.settings.interval),
                health: Health::Up,
                rtt: None,
                in_flight: false,
            });
        }
    }

    /// Marks a heartbeat to `node` as sent; false when one is still on its way.
    pub fn begin(&self, node: u64) -> bool {
        let mut peers = lock(&self.peers);
        match peers.get_mut(&node) {
            Some(p) if !p.in_flight => {
                p.in_flight = true;
                true
            }
            _ => false,
        }
    }

    /// The heartbeat sent to `node` at `sent` ended at `now` (answered or not).
    pub fn end(&self, node: u64, sent: Instant, answered: bool, now: Instant) {
        let mut peers = lock(&self.peers);
        if let Some(p) = peers.get_mut(&node) {
            p.in_flight = false;
            if answered {
                p.detector.heartbeat(now);
                p.rtt = Some(now.saturating_duration_since(sent));
            }
        }
    }

    /// Judges every peer at `now`; returns those whose state changed, with their
    /// new view.
    pub fn judge(&self, now: Instant) -> Vec<(Health, PeerHealth)> {
        let mut changed = Vec::new();
        let mut peers = lock(&self.peers);
        for (&id, p) in peers.iter_mut() {
            let phi = p.detector.phi(now, &self.settings);
            let health = self.health_of(phi);
            if health != p.health {
                let was = p.health;
                p.health = health;
                changed.push((
                    was,
                    PeerHealth {
                        node: id,
                        health,
                        phi,
                        silent_for: now.saturating_duration_since(p.detector.last()),
                        rtt: p.rtt,
                    },
                ));
            }
        }
        changed
    }

    fn health_of(&self, phi: f64) -> Health {
        if phi >= self.settings.down_phi {
            Health::Down
        } else if phi >= self.settings.suspect_phi {
            Health::Suspect
        } else {
            Health::Up
        }
    }

    /// Every peer's view at `now`.
    pub fn view(&self, now: Instant) -> Vec<PeerHealth> {
        let peers = lock(&self.peers);
        let mut v: Vec<PeerHealth> = peers
            .iter()
            .map(|(&id, p)| {
                let phi = p.detector.phi(now, &self.settings);
                PeerHealth {
                    node: id,
                    health: self.health_of(phi),
                    phi,
                    silent_for: now.saturating_duration_since(p.detector.last()),
                    rtt: p.rtt,
                }
            })
            .collect();
        v.sort_by_key(|p| p.node);
        v
    }

    /// The peers down at `now` and silent for at least `d`.
    pub fn down_for_at_least(&self, d: Duration, now: Instant) -> Vec<u64> {
        let peers = lock(&self.peers);
        peers
            .iter()
            .filter(|(_, p)| {
                self.health_of(p.detector.phi(now, &self.settings)) == Health::Down
                    && now.saturating_duration_since(p.detector.last()) >= d
            })
            .map(|(&id, _)| id)
            .collect()
    }

    /// The peers suspect or down at `now`.
    pub fn unhealthy(&self, now: Instant) -> Vec<u64> {
        let peers = lock(&self.peers);
        peers
            .iter()
            .filter(|(_, p)| self.health_of(p.detector.phi(now, &self.settings)) != Health::Up)
            .map(|(&id, _)| id)
            .collect()
    }

    /// The state of `node` at `now` (`Up` for a node with no detector: this one,
    /// or one not in the layout).
    pub fn health(&self, node: u64, now: Instant) -> Health {
        let peers = lock(&self.peers);
        peers
            .get(&node)
            .map(|p| self.health_of(p.detector.phi(now, &self.settings)))
            .unwrap_or(Health::Up)
    }
}

/// How long a heartbeat may wait for its answer (the next one to that peer is
/// not sent before).
fn ping_timeout(s: &HealthSettings) -> Duration {
    (s.interval * 4).max(Duration::from_secs(2))
}

/// Sends the heartbeats of this node and judges its peers, every `interval`,
/// until the block layer is dropped. Each state change is logged; each peer's
/// phi and state are metrics (`cairn_node_phi`, `cairn_node_health`: 0 up,
/// 1 suspect, 2 down; `cairn_node_down_total` counts the times a peer went down).
pub(crate) async fn heartbeats(inner: Weak<super::Inner>) {
    let settings = match inner.upgrade() {
        Some(i) => i.detectors.settings().clone(),
        None => return,
    };
    let timeout = ping_timeout(&settings);
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut known: Vec<u64> = Vec::new();
    loop {
        tick.tick().await;
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let placed = strong
            .placed
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let me = strong.me;
        let nodes: Vec<u64> = placed
            .layout
            .nodes
            .iter()
            .map(|n| n.id)
            .filter(|id| *id != me)
            .collect();
        strong.detectors.retain(&nodes, Instant::now());
        for gone in known.iter().filter(|id| !nodes.contains(id)) {
            let node = format!("{gone:016x}");
            metrics::gauge!("cairn_node_phi", "node" => node.clone()).set(0.0);
            metrics::gauge!("cairn_node_health", "node" => node).set(0.0);
        }
        known.clone_from(&nodes);
        if let Some(peers) = &strong.peers {
            for &id in &nodes {
                let Some(addr) = placed.rpc.get(&id) else {
                    continue;
                };
                if !strong.detectors.begin(id) {
                    continue;
                }
                let (peers, addr, back) = (peers.clone(), addr.clone(), Arc::downgrade(&strong));
                tokio::spawn(async move {
                    let sent = Instant::now();
                    let res = peers
                        .call_node(id, &addr, super::SVC_PING, Bytes::new(), timeout)
                        .await;
                    if let Some(inner) = back.upgrade() {
                        inner.detectors.end(id, sent, res.is_ok(), Instant::now());
                    }
                });
            }
        }
        let now = Instant::now();
        for (was, p) in strong.detectors.judge(now) {
            let node = format!("{:016x}", p.node);
            let silent_ms = p.silent_for.as_millis() as u64;
            let phi = (p.phi * 100.0).round() / 100.0;
            match p.health {
                Health::Down => {
                    metrics::counter!("cairn_node_down_total", "node" => node.clone()).increment(1);
                    tracing::warn!(%node, phi, silent_ms, "node is down");
                }
                Health::Suspect if was == Health::Up => {
                    tracing::info!(%node, phi, silent_ms, "node is suspect");
                }
                Health::Suspect => {
                    tracing::info!(%node, phi, "node is answering again (suspect)");
                }
                Health::Up => tracing::info!(%node, "node is up"),
            }
        }
        for p in strong.detectors.view(now) {
            let node = format!("{:016x}", p.node);
            metrics::gauge!("cairn_node_phi", "node" => node.clone()).set(p.phi);
            let h = match p.health {
                Health::Up => 0.0,
                Health::Suspect => 1.0,
                Health::Down => 2.0,
            };
            metrics::gauge!("cairn_node_health", "node" => node).set(h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn phi_grows_with_silence_and_is_small_when_on_time() {
        // The tail of a normal distribution: phi(mean) = log10(2).
        assert!((phi(1.0, 1.0, 0.1) - 2f64.log10()).abs() < 1e-3);
        // Well before the mean, close to 0; far after, large and capped.
        assert!(phi(0.0, 1.0, 0.1) < 1e-3);
        let mut last = 0.0;
        for t in 1..40 {
            let p = phi(1.0 + f64::from(t) * 0.05, 1.0, 0.1);
            assert!(p >= last, "phi fell at {t}");
            last = p;
        }
        assert!(phi(1e6, 1.0, 0.1) == 100.0);
        // Three deviations past the mean: P ≈ 0.00135, phi ≈ 2.87.
        assert!((phi(1.3, 1.0, 0.1) - 2.87).abs() < 0.05);
    }

    #[test]
    fn a_steady_peer_stays_up_and_a_silent_one_goes_suspect_then_down() {
        let s = HealthSettings::default();
        let t0 = Instant::now();
        let d = Detectors::new(s.clone());
        d.retain(&[7], t0);
        // Heartbeats every 500 ms for 10 s.
        for i in 1..=20 {
            assert!(d.begin(7));
            d.end(7, at(t0, i * 500 - 2), true, at(t0, i * 500));
            assert!(d.judge(at(t0, i * 500 + 1)).is_empty());
        }
        let last = 20 * 500;
        assert_eq!(d.health(7, at(t0, last + 900)), Health::Up);
        // Silence: suspect, then down, in that order, within a few seconds.
        let mut suspect_at = None;
        let mut down_at = None;
        for ms in (0..10_000).step_by(50) {
            for (was, p) in d.judge(at(t0, last + ms)) {
                match p.health {
                    Health::Suspect => suspect_at = Some((ms, was)),
                    Health::Down => down_at = Some((ms, was)),
                    Health::Up => panic!("back up without a heartbeat"),
                }
            }
        }
        let (s_ms, s_was) = suspect_at.expect("never suspect");
        let (d_ms, d_was) = down_at.expect("never down");
        assert_eq!((s_was, d_was), (Health::Up, Health::Suspect));
        assert!(
            s_ms < d_ms && d_ms <= 3000,
            "suspect {s_ms} ms, down {d_ms} ms"
        );
        // One answer brings it back up.
        d.end(7, at(t0, last + 10_000), true, at(t0, last + 10_001));
        let back = d.judge(at(t0, last + 10_002));
        assert_eq!(back.len(), 1);
        assert_eq!((back[0].0, back[0].1.health), (Health::Down, Health::Up));
    }

    #[test]
    fn a_peer_never_heard_from_goes_down_and_heartbeats_do_not_overlap() {
        let s = HealthSettings::default();
        let t0 = Instant::now();
        let d = Detectors::new(s);
        d.retain(&[1, 2], t0);
        assert_eq!(d.health(1, at(t0, 100)), Health::Up);
        assert_eq!(d.health(1, at(t0, 5000)), Health::Down);
        // One heartbeat at a time per peer.
        assert!(d.begin(1));
        assert!(!d.begin(1));
        d.end(1, t0, false, at(t0, 10));
        assert!(d.begin(1));
        // A node unknown to the detectors is taken as up; retain drops the rest.
        assert_eq!(d.health(99, at(t0, 9999)), Health::Up);
        d.retain(&[2], t0);
        assert_eq!(d.view(at(t0, 1)).len(), 1);
    }

    #[test]
    fn bad_settings_are_named() {
        let mut s = HealthSettings {
            down_phi: 1.0,
            ..Default::default()
        };
        assert!(s.validate().unwrap_err().contains("phi_down"));
        s.down_phi = 8.0;
        s.suspect_phi = f64::NAN;
        assert!(s.validate().unwrap_err().contains("phi_suspect"));
        s.suspect_phi = 3.0;
        s.interval = Duration::ZERO;
        assert!(s.validate().unwrap_err().contains("heartbeat_interval"));
        s.interval = Duration::from_millis(500);
        assert!(s.validate().is_ok());
    }
}
