//! PG states as the monitors see them: every OSD reports the PGs it leads (their state,
//! acting set, version, objects left to recover) to every monitor, a few times a second
//! when something changed and every `osd_pg_stats_interval` otherwise; each monitor
//! keeps the latest report of each OSD in memory (not in Raft: it is rebuilt within
//! seconds) and answers `sluice pg ls|stat|query`, `sluice status` and health from it.
//!
//! A PG's state is its current primary's report, when that report is fresh (younger
//! than [`STALE_AFTER`]) and names the PG with the up set of the current map. Otherwise:
//! `down` when no OSD of its placement is up, `peering` when the primary's report shows
//! another acting set (it has not peered for this map yet), `unknown` when the primary
//! has not reported it, `stale` when the primary stopped reporting.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::api::{Check, HealthStatus, PgReport, PgRow, PgStatsReport, PgTable};
use crate::maps::OsdId;
use crate::maps::OsdMap;
use crate::maps::placement::{self, PgId};

/// A report older than this no longer describes its PGs.
pub const STALE_AFTER: Duration = Duration::from_secs(10);

/// The latest report of every OSD.
#[derive(Debug, Default)]
pub struct PgStats {
    by_osd: HashMap<OsdId, (Instant, PgStatsReport)>,
    /// Scrubs asked for and not yet handed to their PG's primary.
    scrubs: Vec<crate::api::ScrubRequest>,
}

impl PgStats {
    pub fn record(&mut self, r: PgStatsReport, now: Instant) {
        self.by_osd.insert(r.id, (now, r));
    }

    /// Queues a scrub for the primary of its PG (one per PG: a newer request replaces
    /// an older one).
    pub fn request_scrub(&mut self, r: crate::api::ScrubRequest) {
        self.scrubs.retain(|s| (s.pool, s.pg) != (r.pool, r.pg));
        self.scrubs.push(r);
    }

    /// The queued scrubs of the PGs `osd` leads in `map`, taken from the queue.
    pub fn take_scrubs(&mut self, map: &OsdMap, osd: OsdId) -> Vec<crate::api::ScrubRequest> {
        let leads = |s: &crate::api::ScrubRequest| {
            map.pools.get(&crate::maps::PoolId(s.pool)).is_some_and(|pool| {
                let pgid = PgId { pool: pool.id, pg: s.pg };
                placement::pg_mapping(map, pool, pgid).primary() == Some(osd)
            })
        };
        let (mine, rest) = std::mem::take(&mut self.scrubs).into_iter().partition(leads);
        self.scrubs = rest;
        mine
    }

    /// Every PG of every pool of `map`, in pool and PG order.
    pub fn table(&self, map: &OsdMap, now: Instant) -> PgTable {
        let mut pgs = Vec::new();
        let mut summary: BTreeMap<String, usize> = BTreeMap::new();
        for pool in map.pools.values() {
            for n in 0..pool.pg_num {
                let pgid = PgId { pool: pool.id, pg: n };
                let m = placement::pg_mapping(map, pool, pgid);
                let primary = m.primary();
                let up: Vec<u32> = m.up.iter().map(|o| o.0).collect();
                let report = primary.and_then(|p| self.by_osd.get(&p));
                let found = report.and_then(|(at, r)| {
                    r.pgs.iter().find(|p| p.pool == pool.id.0 && p.pg == n).map(|p| (*at, r, p))
                });
                let scrub_errors = found.map_or(0, |(_, _, p)| p.scrub_errors);
                let last_scrub_ms = found.map_or(0, |(_, _, p)| p.last_scrub_ms);
                let last_deep_scrub_ms = found.map_or(0, |(_, _, p)| p.last_deep_scrub_ms);
                let (state, acting, version, recovering, age, epoch) = match (primary, found) {
                    (None, _) => ("down".to_string(), Vec::new(), 0, 0, None, 0),
                    (Some(_), Some((at, r, p))) => {
                        let age = now.saturating_duration_since(at);
                        let state = if age > STALE_AFTER {
                            format!("stale+{}", p.state.join("+"))
                        } else if p.acting != up {
                            "peering".to_string()
                        } else {
                            p.state.join("+")
                        };
                        (state, p.acting.clone(), p.version, p.recovering, Some(age), r.epoch)
                    }
                    (Some(_), None) => {
                        let stale = report.is_some_and(|(at, _)| {
                            now.saturating_duration_since(*at) > STALE_AFTER
                        });
                        let state = if stale { "stale" } else { "unknown" };
                        (state.to_string(), Vec::new(), 0, 0, None, 0)
                    }
                };
                *summary.entry(state.clone()).or_default() += 1;
                pgs.push(PgRow {
                    pgid: pgid.to_string(),
                    pool: pool.id.0,
                    pg: n,
                    state,
                    up,
                    acting,
                    primary: primary.map(|p| p.0),
                    version,
                    recovering,
                    scrub_errors,
                    last_scrub_ms,
                    last_deep_scrub_ms,
                    reported_secs_ago: age.map(|a| a.as_secs_f64()),
                    reported_epoch: epoch,
                });
            }
        }
        PgTable { epoch: map.epoch, pgs, summary }
    }

    /// Health checks from `table`: PGs not active (`PG_AVAILABILITY`), degraded or
    /// undersized (`PG_DEGRADED`), stale. A PG its primary has not reported yet counts
    /// only once that primary's report is stale (it reports within seconds of a change).
    pub fn checks(&self, table: &PgTable, now: Instant) -> Vec<Check> {
        let mut checks = Vec::new();
        let unreported_long = |row: &PgRow| {
            row.primary.is_some_and(|p| {
                self.by_osd
                    .get(&OsdId(p))
                    .is_none_or(|(at, _)| now.saturating_duration_since(*at) > STALE_AFTER)
            })
        };
        let inactive: Vec<&PgRow> = table
            .pgs
            .iter()
            .filter(|r| {
                let has = |s: &str| r.state.split('+').any(|x| x == s);
                if r.state == "unknown" {
                    unreported_long(r)
                } else {
                    !has("active") || has("stale")
                }
            })
            .collect();
        if !inactive.is_empty() {
            let down = inactive.iter().any(|r| r.state.split('+').any(|x| x == "down"));
            checks.push(Check {
                name: "PG_AVAILABILITY".into(),
                severity: if down { HealthStatus::Err } else { HealthStatus::Warn },
                summary: format!("{} pgs not active", inactive.len()),
                detail: inactive
                    .iter()
                    .take(50)
                    .map(|r| format!("pg {} is {}, up {:?}", r.pgid, r.state, r.up))
                    .collect(),
            });
        }
        let degraded: Vec<&PgRow> = table
            .pgs
            .iter()
            .filter(|r| r.state.split('+').any(|x| x == "degraded" || x == "undersized"))
            .collect();
        if !degraded.is_empty() {
            checks.push(Check {
                name: "PG_DEGRADED".into(),
                severity: HealthStatus::Warn,
                summary: format!("{} pgs degraded", degraded.len()),
                detail: degraded
                    .iter()
                    .take(50)
                    .map(|r| format!("pg {} is {}, acting {:?}", r.pgid, r.state, r.acting))
                    .collect(),
            });
        }
        let damaged: Vec<&PgRow> =
            table.pgs.iter().filter(|r| r.state.split('+').any(|x| x == "inconsistent")).collect();
        if !damaged.is_empty() {
            let errors: u64 = damaged.iter().map(|r| r.scrub_errors).sum();
            checks.push(Check {
                name: "PG_DAMAGED".into(),
                severity: HealthStatus::Err,
                summary: format!(
                    "possible data damage: {} pgs inconsistent ({errors} scrub errors)",
                    damaged.len()
                ),
                detail: damaged
                    .iter()
                    .take(50)
                    .map(|r| {
                        format!(
                            "pg {} is {}, {} scrub errors: `sluice pg repair {}`",
                            r.pgid, r.state, r.scrub_errors, r.pgid
                        )
                    })
                    .collect(),
            });
        }
        checks
    }
}

/// The report of one PG (what a primary's core sends).
pub fn report(pgid: PgId, epoch: u64, acting: &[OsdId], state: Vec<&str>) -> PgReport {
    PgReport {
        pool: pgid.pool.0,
        pg: pgid.pg,
        epoch,
        acting: acting.iter().map(|o| o.0).collect(),
        version: 0,
        state: state.into_iter().map(str::to_string).collect(),
        recovering: 0,
        scrub_errors: 0,
        last_scrub_ms: 0,
        last_deep_scrub_ms: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::PoolId;
    use crate::maps::osdmap::{FailureDomain, Location, Maintenance, OsdAddrs, OsdInfo, Pool};

    fn map(up: &[bool]) -> OsdMap {
        let mut m = OsdMap::new([1; 16]);
        m.epoch = 5;
        for (i, u) in up.iter().enumerate() {
            let id = OsdId(i as u32);
            m.osds.insert(
                id,
                OsdInfo {
                    id,
                    uuid: [i as u8; 16],
                    addrs: Some(OsdAddrs {
                        public: "127.0.0.1:1".parse().unwrap(),
                        core_ports: vec![1],
                    }),
                    location: Location { rack: "r".into(), host: format!("h{i}") },
                    weight: crate::maps::osdmap::ONE,
                    up: *u,
                    is_in: true,
                    primary_affinity: crate::maps::osdmap::ONE,
                    maintenance: Maintenance::None,
                    up_from: 1,
                    down_at: 0,
                },
            );
        }
        m.pools.insert(
            PoolId(1),
            Pool {
                id: PoolId(1),
                name: "p".into(),
                size: 3,
                min_size: 2,
                pg_num: 4,
                failure_domain: FailureDomain::Host,
            },
        );
        m
    }

    /// Every primary reports every PG it leads as `state`.
    fn reports(m: &OsdMap, stats: &mut PgStats, state: &[&str], at: Instant) {
        let pool = &m.pools[&PoolId(1)];
        let mut by: HashMap<OsdId, Vec<PgReport>> = HashMap::new();
        for n in 0..pool.pg_num {
            let pgid = PgId { pool: pool.id, pg: n };
            let mm = placement::pg_mapping(m, pool, pgid);
            if let Some(p) = mm.primary() {
                by.entry(p).or_default().push(report(pgid, m.epoch, &mm.up, state.to_vec()));
            }
        }
        for id in m.osds.keys() {
            let pgs = by.remove(id).unwrap_or_default();
            stats.record(PgStatsReport { id: *id, uuid: [0; 16], epoch: m.epoch, pgs }, at);
        }
    }

    #[test]
    fn fresh_reports_give_the_states_and_health_follows() {
        let m = map(&[true, true, true]);
        let mut s = PgStats::default();
        let now = Instant::now();
        // Nothing reported yet: unknown, but not unhealthy until the reports are late.
        let t = s.table(&m, now);
        assert!(t.pgs.iter().all(|r| r.state == "unknown"), "{t:?}");
        // Reports that do not name the PGs yet (the OSDs have not seen the pool).
        for id in m.osds.keys() {
            s.record(PgStatsReport { id: *id, uuid: [0; 16], epoch: 4, pgs: Vec::new() }, now);
        }
        let t = s.table(&m, now);
        assert!(t.pgs.iter().all(|r| r.state == "unknown"), "{t:?}");
        assert!(s.checks(&t, now).is_empty());
        let later = now + STALE_AFTER + Duration::from_secs(1);
        assert!(s.checks(&s.table(&m, later), later).iter().any(|c| c.name == "PG_AVAILABILITY"));
        reports(&m, &mut s, &["active", "clean"], now);
        let t = s.table(&m, now);
        assert_eq!(t.summary.get("active+clean"), Some(&4), "{t:?}");
        assert!(s.checks(&t, now).is_empty());
        // Degraded: a warning; reports gone quiet: stale and not available.
        reports(&m, &mut s, &["active", "undersized", "degraded"], now);
        let c = s.checks(&s.table(&m, now), now);
        assert_eq!(c.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["PG_DEGRADED"]);
        let later = now + STALE_AFTER + Duration::from_secs(1);
        let t = s.table(&m, later);
        assert!(t.pgs.iter().all(|r| r.state.starts_with("stale")), "{t:?}");
        assert!(s.checks(&t, later).iter().any(|c| c.name == "PG_AVAILABILITY"));
    }

    #[test]
    fn a_report_for_another_acting_set_is_peering_and_no_osd_up_is_down() {
        let before = map(&[true, true, true]);
        let mut s = PgStats::default();
        let now = Instant::now();
        reports(&before, &mut s, &["active", "clean"], now);
        // osd.2 went down: the primaries' reports still show three members.
        let mut after = map(&[true, true, false]);
        after.epoch = 6;
        let t = s.table(&after, now);
        for r in &t.pgs {
            if r.primary != Some(2) && r.state != "unknown" {
                assert_eq!(r.state, "peering", "{r:?}");
            }
        }
        let t = s.table(&map(&[false, false, false]), now);
        assert!(t.pgs.iter().all(|r| r.state == "down"), "{t:?}");
        let c = s.checks(&t, now);
        assert!(c.iter().any(|c| c.name == "PG_AVAILABILITY" && c.severity == HealthStatus::Err));
    }
}
