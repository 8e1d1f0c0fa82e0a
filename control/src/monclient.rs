//! Choosing a monitor (lesson 1: clients fail over along an ordered server list).
//!
//! Every client of the monitors (OSDs, the CLI, the client library) holds the ordered
//! monitor list from its config and a [`Selector`] that decides which monitor to talk
//! to. The selection policy orders the list per client:
//!
//! * `static`: the list as given (everyone prefers the first monitor);
//! * `roundrobin`: the list rotated by the client's id, so clients spread evenly;
//! * `shuffle`: a pseudo-random permutation seeded by the client's id (stable for one
//!   client, spread across clients; not recommended when order matters).
//!
//! The first monitor of that order is the client's *preferred* one. On an error the
//! client fails over to the next one in order, invisibly to its callers; while it is
//! away from its preferred monitor it re-checks it every `check_interval` and returns
//! once it answers. Policy and interval can change at runtime (central config); the
//! client stays on its current monitor and the background check brings it home.
//!
//! This is the decision logic only (no I/O), so it is tested deterministically.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Static,
    RoundRobin,
    Shuffle,
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "static" => Ok(Policy::Static),
            "roundrobin" => Ok(Policy::RoundRobin),
            "shuffle" => Ok(Policy::Shuffle),
            other => Err(format!(
                "unknown monitor selection policy {other:?} (static, roundrobin, shuffle)"
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Selector {
    mons: Vec<String>,
    policy: Policy,
    client_id: u64,
    check_interval: Duration,
    /// Indices into `mons`; `order[0]` is the preferred monitor.
    order: Vec<usize>,
    /// Position in `order` of the monitor in use.
    at: usize,
    /// When the preferred monitor was last probed (nanoseconds, caller's clock).
    last_check_ns: u64,
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Selector {
    /// `mons` must not be empty (the config loader refuses an empty list).
    pub fn new(
        mons: Vec<String>,
        policy: Policy,
        client_id: u64,
        check_interval: Duration,
    ) -> Selector {
        assert!(!mons.is_empty(), "no monitors configured");
        let mut s = Selector {
            mons,
            policy,
            client_id,
            check_interval,
            order: Vec::new(),
            at: 0,
            last_check_ns: 0,
        };
        s.order = s.compute_order();
        s
    }

    fn compute_order(&self) -> Vec<usize> {
        let n = self.mons.len();
        let mut order: Vec<usize> = (0..n).collect();
        match self.policy {
            Policy::Static => {}
            Policy::RoundRobin => order.rotate_left((self.client_id % n as u64) as usize),
            Policy::Shuffle => {
                let mut seed = self.client_id ^ 0x5eed;
                for i in (1..n).rev() {
                    let j = (splitmix(&mut seed) % (i as u64 + 1)) as usize;
                    order.swap(i, j);
                }
            }
        }
        order
    }

    /// The monitors in this client's order of preference.
    pub fn order(&self) -> Vec<&str> {
        self.order.iter().map(|&i| self.mons[i].as_str()).collect()
    }

    pub fn preferred(&self) -> &str {
        &self.mons[self.order[0]]
    }

    pub fn current(&self) -> &str {
        &self.mons[self.order[self.at]]
    }

    pub fn on_preferred(&self) -> bool {
        self.at == 0
    }

    /// The monitor in use failed: move to the next one in order (wrapping). Returns it.
    pub fn failed(&mut self) -> &str {
        self.at = (self.at + 1) % self.order.len();
        self.current()
    }

    /// Whether to probe the preferred monitor now (only while away from it).
    pub fn should_check_preferred(&mut self, now_ns: u64) -> bool {
        if self.on_preferred() || self.check_interval.is_zero() {
            return false;
        }
        if now_ns.saturating_sub(self.last_check_ns) < self.check_interval.as_nanos() as u64 {
            return false;
        }
        self.last_check_ns = now_ns;
        true
    }

    /// The preferred monitor answered a probe: go back to it.
    pub fn preferred_is_back(&mut self) {
        self.at = 0;
    }

    /// New policy or interval from central config: keep the monitor in use (the
    /// background check moves the client to its new preferred one).
    pub fn reconfigure(&mut self, policy: Policy, check_interval: Duration) {
        let current = self.order[self.at];
        self.policy = policy;
        self.check_interval = check_interval;
        self.order = self.compute_order();
        self.at = self.order.iter().position(|&i| i == current).expect("same monitors");
    }

    /// A new monitor list (the monitor map changed): keep the current monitor if it is
    /// still listed, else start from the preferred one.
    pub fn set_monitors(&mut self, mons: Vec<String>) {
        assert!(!mons.is_empty(), "no monitors");
        let current = self.current().to_string();
        self.mons = mons;
        self.order = self.compute_order();
        self.at = self.order.iter().position(|&i| self.mons[i] == current).unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mons(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:3300")).collect()
    }

    #[test]
    fn static_fails_over_in_order_and_returns_to_the_preferred_monitor() {
        let mut s = Selector::new(mons(3), Policy::Static, 7, Duration::from_secs(30));
        assert_eq!(s.current(), "10.0.0.0:3300");
        assert_eq!(s.failed(), "10.0.0.1:3300");
        assert_eq!(s.failed(), "10.0.0.2:3300");
        let s30 = 30_000_000_000;
        assert!(s.should_check_preferred(s30));
        assert!(!s.should_check_preferred(s30 + 1), "not before the interval");
        assert!(s.should_check_preferred(2 * s30));
        s.preferred_is_back();
        assert_eq!(s.current(), "10.0.0.0:3300");
        assert!(!s.should_check_preferred(10 * s30), "already home");
        assert_eq!(s.failed(), "10.0.0.1:3300");
        s.failed();
        assert_eq!(s.failed(), "10.0.0.0:3300", "wraps around");
    }

    #[test]
    fn roundrobin_spreads_clients_evenly() {
        let mut per_mon = [0usize; 3];
        for client in 0..300 {
            let s = Selector::new(mons(3), Policy::RoundRobin, client, Duration::ZERO);
            per_mon[mons(3).iter().position(|m| m == s.preferred()).unwrap()] += 1;
            let o = s.order();
            let first = mons(3).iter().position(|m| m == o[0]).unwrap();
            assert_eq!(o[1], mons(3)[(first + 1) % 3], "the list order is kept, only rotated");
        }
        assert_eq!(per_mon, [100, 100, 100]);
    }

    #[test]
    fn shuffle_is_a_stable_permutation_per_client_and_spreads() {
        let mut first = std::collections::BTreeMap::new();
        for client in 0..600 {
            let a = Selector::new(mons(5), Policy::Shuffle, client, Duration::ZERO);
            let b = Selector::new(mons(5), Policy::Shuffle, client, Duration::ZERO);
            assert_eq!(a.order(), b.order(), "stable for one client");
            let mut sorted: Vec<_> = a.order().into_iter().map(String::from).collect();
            sorted.sort();
            assert_eq!(sorted, mons(5), "a permutation");
            *first.entry(a.preferred().to_string()).or_insert(0) += 1;
        }
        assert_eq!(first.len(), 5);
        assert!(first.values().all(|&n| n > 60), "spread: {first:?}");
    }

    #[test]
    fn runtime_reconfiguration_keeps_the_connection_then_goes_home() {
        let mut s = Selector::new(mons(3), Policy::Static, 4, Duration::from_secs(10));
        s.failed();
        assert_eq!(s.current(), "10.0.0.1:3300");
        s.reconfigure(Policy::RoundRobin, Duration::from_secs(1));
        assert_eq!(s.current(), "10.0.0.1:3300", "no reconnect on a policy change");
        assert_eq!(s.preferred(), "10.0.0.1:3300", "client 4 of 3 prefers the second");
        assert!(s.on_preferred());
        s.reconfigure(Policy::Static, Duration::from_secs(1));
        assert!(!s.on_preferred());
        assert!(s.should_check_preferred(1_000_000_000));
        s.preferred_is_back();
        assert_eq!(s.current(), "10.0.0.0:3300");
        s.set_monitors(vec!["10.0.0.9:3300".into(), "10.0.0.0:3300".into()]);
        assert_eq!(s.current(), "10.0.0.0:3300", "still listed: kept");
        s.set_monitors(vec!["10.0.0.8:3300".into()]);
        assert_eq!(s.current(), "10.0.0.8:3300");
        assert_eq!(
            "bogus".parse::<Policy>().unwrap_err(),
            "unknown monitor selection policy \"bogus\" (static, roundrobin, shuffle)"
        );
    }
}
