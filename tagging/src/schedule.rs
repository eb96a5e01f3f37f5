//! Time policies: a cron schedule (five fields, in a time zone) or a fixed
//! interval per volume or group, with a retention count.
//!
//! Every policy fires at most once per slot, also across restarts: the
//! last slot fired is kept in a state file, and the tag name is made from
//! the slot, so a crash between tagging and storing the state cannot tag
//! the same slot twice either (the name already exists).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use tidemark_journal::fs::{document, RealFs};

/// What a rule applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// One volume.
    Volume(String),
    /// Every volume of a consistency group.
    Group(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Volume(v) => write!(f, "volume {v}"),
            Target::Group(g) => write!(f, "group {g}"),
        }
    }
}

/// The time zone a cron schedule is read in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Zone {
    /// UTC.
    Utc,
    /// The machine's local time.
    Local,
    /// A named zone (`Europe/Berlin`).
    Named(chrono_tz::Tz),
}

impl Zone {
    /// `UTC`, `local`, or an IANA name.
    pub fn parse(text: &str) -> Result<Zone, String> {
        match text {
            "UTC" | "utc" | "Z" => Ok(Zone::Utc),
            "local" => Ok(Zone::Local),
            name => chrono_tz::Tz::from_str(name).map(Zone::Named).map_err(|_| {
                format!(
                    "{name:?} is not a time zone (use UTC, local, or a name like Europe/Berlin)"
                )
            }),
        }
    }
}

/// When a policy fires.
#[derive(Clone, Debug)]
pub enum When {
    /// A five-field cron expression in a zone.
    Cron(Box<croner::Cron>, Zone),
    /// Every this long, slots aligned to the Unix epoch.
    Every(Duration),
}

impl When {
    /// Parses a five-field cron expression (minute hour day month weekday).
    pub fn cron(expression: &str, zone: Zone) -> Result<When, String> {
        let fields = expression.split_whitespace().count();
        if fields != 5 {
            return Err(format!(
                "{expression:?} has {fields} fields; a cron expression has five: minute hour day-of-month month day-of-week"
            ));
        }
        croner::Cron::from_str(expression)
            .map(|c| When::Cron(Box::new(c), zone))
            .map_err(|e| format!("{expression:?} is not a valid cron expression: {e}"))
    }

    /// Every `interval` (at least a second).
    pub fn every(interval: Duration) -> Result<When, String> {
        if interval < Duration::from_secs(1) {
            return Err(format!(
                "an interval of {interval:?} is shorter than a second"
            ));
        }
        Ok(When::Every(interval))
    }

    /// The newest slot at or before `now`.
    pub fn latest_slot(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            When::Every(interval) => {
                let step = i64::try_from(interval.as_nanos()).ok()?;
                let ns = now.timestamp_nanos_opt()?;
                Some(Utc.timestamp_nanos(ns - ns.rem_euclid(step)))
            }
            When::Cron(cron, zone) => {
                // Cron slots are whole minutes.
                let now = now.with_timezone(&Utc);
                match zone {
                    Zone::Utc => cron.find_previous_occurrence(&now, true).ok(),
                    Zone::Local => cron
                        .find_previous_occurrence(&now.with_timezone(&chrono::Local), true)
                        .ok()
                        .map(|t| t.with_timezone(&Utc)),
                    Zone::Named(tz) => cron
                        .find_previous_occurrence(&now.with_timezone(tz), true)
                        .ok()
                        .map(|t| t.with_timezone(&Utc)),
                }
            }
        }
    }

    /// True if slot names need seconds (intervals under a minute).
    pub fn needs_seconds(&self) -> bool {
        matches!(self, When::Every(d) if d.as_secs() % 60 != 0)
    }
}

/// One time policy.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Its name: tags are `policy:NAME-SLOT`.
    pub name: String,
    /// What it tags.
    pub target: Target,
    /// When.
    pub when: When,
    /// How many of its tags to keep per volume (oldest deleted first).
    pub keep: Option<usize>,
    /// Verify each tag it makes.
    pub verify: bool,
}

impl Policy {
    /// The key of this policy's state (name and target).
    pub fn key(&self) -> String {
        format!("{}@{}", self.name, self.target)
    }

    /// The tag name for `slot`.
    pub fn tag_name(&self, slot: DateTime<Utc>) -> String {
        crate::tag::timed_name(
            &format!("policy:{}", self.name),
            slot,
            self.when.needs_seconds(),
        )
    }
}

/// The schedule state's document format (see `tidemark_journal::fs::document`).
const STATE_FORMAT: &str = "tidemark-schedule-state";

/// The last slot each policy fired for, kept in a file.
#[derive(Debug)]
pub struct ScheduleState {
    path: PathBuf,
    last: BTreeMap<String, i64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    last_slot_ns: BTreeMap<String, i64>,
}

impl ScheduleState {
    /// Loads the state kept at `path` (none yet: empty).
    pub fn load(path: &Path) -> ScheduleState {
        let last = match document::load::<StateFile>(&RealFs, path, STATE_FORMAT, 1..=1) {
            Ok(state) => state.map(|(_, f)| f.last_slot_ns).unwrap_or_default(),
            Err(e) => {
                // At worst a policy tags a slot it already tagged.
                tracing::warn!(error = %e, "schedule state lost; policies start afresh");
                BTreeMap::new()
            }
        };
        ScheduleState {
            path: path.to_path_buf(),
            last,
        }
    }

    /// The slot `policy` should fire for now, if any. A policy seen for
    /// the first time starts with the next slot: it does not tag the past.
    pub fn due(&mut self, policy: &Policy, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let slot = policy.when.latest_slot(now)?;
        let slot_ns = slot.timestamp_nanos_opt()?;
        match self.last.get(&policy.key()) {
            Some(&last) if slot_ns <= last => None,
            Some(_) => Some(slot),
            None => {
                self.last.insert(policy.key(), slot_ns);
                let _ = self.store();
                None
            }
        }
    }

    /// Records that `policy` fired for `slot`, durably.
    pub fn fired(&mut self, policy: &Policy, slot: DateTime<Utc>) -> Result<(), String> {
        self.last
            .insert(policy.key(), slot.timestamp_nanos_opt().unwrap_or(i64::MAX));
        self.store()
    }

    fn store(&self) -> Result<(), String> {
        let file = StateFile {
            last_slot_ns: self.last.clone(),
        };
        document::store(&RealFs, &self.path, STATE_FORMAT, 1, &file)
            .map_err(|e| format!("cannot store schedule state {}: {e}", self.path.display()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn nightly(zone: Zone) -> Policy {
        Policy {
            name: "nightly".into(),
            target: Target::Volume("db".into()),
            when: When::cron("0 22 * * *", zone).unwrap(),
            keep: Some(3),
            verify: false,
        }
    }

    #[test]
    fn cron_slots_in_utc_and_in_a_named_zone() {
        let p = nightly(Zone::Utc);
        assert_eq!(
            p.when.latest_slot(at("2026-11-21T22:30:00Z")),
            Some(at("2026-11-21T22:00:00Z"))
        );
        assert_eq!(
            p.when.latest_slot(at("2026-11-21T21:59:59Z")),
            Some(at("2026-11-20T22:00:00Z"))
        );
        let berlin = nightly(Zone::parse("Europe/Berlin").unwrap());
        // 22:00 in Berlin in November is 21:00 UTC.
        assert_eq!(
            berlin.when.latest_slot(at("2026-11-21T21:30:00Z")),
            Some(at("2026-11-21T21:00:00Z"))
        );
        assert_eq!(
            p.tag_name(at("2026-11-21T22:00:00Z")),
            "policy:nightly-2026-11-21T22:00Z"
        );
    }

    #[test]
    fn bad_schedules_say_what_is_wrong() {
        assert!(When::cron("0 22 * *", Zone::Utc)
            .unwrap_err()
            .contains("five"));
        assert!(When::cron("0 25 * * *", Zone::Utc)
            .unwrap_err()
            .contains("not a valid cron"));
        assert!(Zone::parse("Mars/Olympus")
            .unwrap_err()
            .contains("not a time zone"));
        assert!(When::every(Duration::from_millis(10)).is_err());
    }

    #[test]
    fn a_policy_fires_once_per_slot_and_remembers_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let p = Policy {
            name: "often".into(),
            target: Target::Group("g".into()),
            when: When::every(Duration::from_secs(900)).unwrap(),
            keep: None,
            verify: false,
        };
        let mut state = ScheduleState::load(&path);
        // First sight: no tag for the past.
        assert_eq!(state.due(&p, at("2026-11-21T10:07:00Z")), None);
        assert_eq!(state.due(&p, at("2026-11-21T10:14:59Z")), None);
        let slot = state.due(&p, at("2026-11-21T10:15:01Z")).unwrap();
        assert_eq!(slot, at("2026-11-21T10:15:00Z"));
        // Not fired yet (e.g. tagging failed): still due.
        assert_eq!(state.due(&p, at("2026-11-21T10:16:00Z")), Some(slot));
        state.fired(&p, slot).unwrap();
        assert_eq!(state.due(&p, at("2026-11-21T10:29:00Z")), None);
        // A restart in the same slot does not fire it again.
        let mut state = ScheduleState::load(&path);
        assert_eq!(state.due(&p, at("2026-11-21T10:29:59Z")), None);
        // Slots missed while down: the newest one fires, once.
        let slot = state.due(&p, at("2026-11-21T11:40:00Z")).unwrap();
        assert_eq!(slot, at("2026-11-21T11:30:00Z"));
        state.fired(&p, slot).unwrap();
        assert_eq!(state.due(&p, at("2026-11-21T11:44:00Z")), None);
    }
}
