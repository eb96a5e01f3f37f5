//! The tagger: runs the time policies and log rules on threads of its own,
//! turns anomaly alarms into tags, and does app-consistent tags and
//! verifications on request. It reaches volumes only through [`Host`],
//! which the daemon implements.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::Utc;
use parking_lot::Mutex;
use tidemark_journal::{Clock, Seq, Timestamp};

use crate::anomaly::{Alarm, AnomalySettings, Detector, ObservedWrite};
use crate::hooks::{app_consistent, Hook};
use crate::log_watch::{Follower, LogRule};
use crate::schedule::{Policy, ScheduleState, Target};
use crate::tag::{timed_name, Consistency, Source, Tag, TagBody, Verification, Verified};
use crate::verify::{run_check, Check};

/// What the tagger needs of the daemon.
pub trait Host: Send + Sync + 'static {
    /// The volumes `target` names now.
    fn volumes_of(&self, target: &Target) -> Vec<String>;
    /// The consistency group of `volume`.
    fn group_of(&self, volume: &str) -> Option<String>;
    /// Flushes `volume` and tags the point after the flush; refuses a name
    /// that exists.
    fn tag_now(&self, volume: &str, name: &str, body: TagBody) -> Result<Tag, String>;
    /// Sets (or replaces) tag `name` for the earlier point `seq`.
    fn tag_at(&self, volume: &str, name: &str, seq: Seq, body: TagBody) -> Result<Tag, String>;
    /// The newest point at or before `at`.
    fn seq_at(&self, volume: &str, at: Timestamp) -> Result<(Seq, Timestamp), String>;
    /// Every tag of `volume`, oldest first.
    fn tags(&self, volume: &str) -> Result<Vec<Tag>, String>;
    /// Deletes a tag.
    fn delete_tag(&self, volume: &str, name: &str) -> Result<(), String>;
    /// The newest flush point of `volume` before `seq`, and its time.
    fn last_flush_before(&self, volume: &str, seq: Seq) -> Option<(Seq, Timestamp)>;
    /// A throw-away writable view of `seq` for a check: its NBD URI, and a
    /// guard that removes it when dropped.
    fn check_export(&self, volume: &str, seq: Seq) -> Result<(String, Box<dyn Send>), String>;
}

/// Everything the tagging tables configure.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// `[[tagging.schedule]]`.
    pub policies: Vec<Policy>,
    /// `[[tagging.log_rule]]`.
    pub log_rules: Vec<LogRule>,
    /// `[[tagging.hook]]`.
    pub hooks: Vec<Hook>,
    /// `[tagging.anomaly]`.
    pub anomaly: AnomalySettings,
    /// Limit of one verification.
    pub verify_timeout: Duration,
    /// Where state (last schedule slots) and scratch space live.
    pub state_dir: PathBuf,
}

/// How often the policy and log threads look.
const TICK: Duration = Duration::from_millis(200);

/// The running tagger.
pub struct Tagger {
    host: Arc<dyn Host>,
    settings: Settings,
    detector: Detector,
    alarms: Mutex<Option<Sender<Alarm>>>,
    stop: Arc<AtomicBool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Tagger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tagger")
            .field("policies", &self.settings.policies.len())
            .field("log_rules", &self.settings.log_rules.len())
            .finish()
    }
}

impl Tagger {
    /// Starts the policy, log-rule and anomaly threads.
    pub fn start(host: Arc<dyn Host>, settings: Settings, clock: Arc<dyn Clock>) -> Arc<Tagger> {
        if let Err(e) = tidemark_journal::fs::create_dir_all_durably(
            &tidemark_journal::fs::RealFs,
            &settings.state_dir,
        ) {
            tracing::warn!(dir = %settings.state_dir.display(), error = %e, "cannot make the tagger's state directory");
        }
        let (tx, rx) = channel::<Alarm>();
        let tagger = Arc::new(Tagger {
            detector: Detector::new(settings.anomaly),
            host,
            settings,
            alarms: Mutex::new(Some(tx)),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Mutex::new(Vec::new()),
            clock,
        });
        let mut threads = Vec::new();
        if !tagger.settings.policies.is_empty() {
            let t = tagger.clone();
            threads.push(std::thread::spawn(move || t.run_policies()));
        }
        if !tagger.settings.log_rules.is_empty() {
            let t = tagger.clone();
            threads.push(std::thread::spawn(move || t.run_log_rules()));
        }
        let t = tagger.clone();
        threads.push(std::thread::spawn(move || loop {
            match rx.recv_timeout(TICK) {
                Ok(alarm) => t.tag_alarm(&alarm),
                Err(RecvTimeoutError::Timeout) if !t.stop.load(Ordering::SeqCst) => {}
                Err(_) => break,
            }
        }));
        *tagger.threads.lock() = threads;
        tagger
    }

    /// Stops the threads.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.alarms.lock().take();
        for t in std::mem::take(&mut *self.threads.lock()) {
            let _ = t.join();
        }
    }

    /// Feeds one acknowledged write to anomaly detection (cheap: a lock,
    /// a bitmap and a bucket).
    pub fn observe_write(&self, write: &ObservedWrite<'_>) {
        if let Some(alarm) = self.detector.observe(write, Instant::now()) {
            if let Some(tx) = self.alarms.lock().as_ref() {
                let _ = tx.send(alarm);
            }
        }
    }

    fn now(&self) -> chrono::DateTime<Utc> {
        self.clock.now().to_datetime()
    }

    fn run_policies(self: Arc<Self>) {
        let mut state = ScheduleState::load(&self.settings.state_dir.join("schedule-state.json"));
        while !self.stop.load(Ordering::SeqCst) {
            for policy in &self.settings.policies {
                let now = self.now();
                if let Some(slot) = state.due(policy, now) {
                    if self.fire(policy, slot, now) {
                        if let Err(e) = state.fired(policy, slot) {
                            tracing::warn!(policy = %policy.name, error = %e, "schedule state not stored");
                        }
                    }
                }
            }
            std::thread::sleep(TICK);
        }
    }

    /// Tags every volume of `policy` for `slot`; true when all are tagged.
    fn fire(
        self: &Arc<Self>,
        policy: &Policy,
        slot: chrono::DateTime<Utc>,
        now: chrono::DateTime<Utc>,
    ) -> bool {
        let name = policy.tag_name(slot);
        let late = now - slot > chrono::Duration::seconds(60);
        let mut all = true;
        for volume in self.host.volumes_of(&policy.target) {
            let result = if late {
                // A slot missed while the daemon was down: tag the point
                // the volume was at then.
                let mut body = TagBody::new(
                    Source::Schedule,
                    Consistency::Unknown,
                    "slot missed while stopped; tagged at the slot's time",
                )
                .from_origin(&policy.name);
                body.point_ns = slot.timestamp_nanos_opt();
                self.host
                    .seq_at(&volume, Timestamp::from_datetime(slot))
                    .and_then(|(seq, _)| self.host.tag_at(&volume, &name, seq, body))
            } else {
                let body = TagBody::new(Source::Schedule, Consistency::Crash, "")
                    .from_origin(&policy.name);
                self.host.tag_now(&volume, &name, body)
            };
            match result {
                Ok(tag) => {
                    tracing::info!(volume = %volume, tag = %name, seq = tag.seq, "policy tag");
                    self.prune(policy, &volume);
                    if policy.verify {
                        self.verify_in_background(&volume, &name);
                    }
                }
                Err(e) if e.contains("already has a tag") => {}
                Err(e) => {
                    all = false;
                    tracing::warn!(volume = %volume, tag = %name, error = %e, "policy could not tag");
                }
            }
        }
        all
    }

    /// Deletes `policy`'s oldest tags of `volume` beyond its `keep`.
    fn prune(&self, policy: &Policy, volume: &str) {
        let Some(keep) = policy.keep else { return };
        let Ok(tags) = self.host.tags(volume) else {
            return;
        };
        let mine: Vec<&Tag> = tags
            .iter()
            .filter(|t| {
                t.body.source == Source::Schedule && t.body.origin.as_deref() == Some(&policy.name)
            })
            .collect();
        for old in mine.iter().take(mine.len().saturating_sub(keep)) {
            if let Err(e) = self.host.delete_tag(volume, &old.name) {
                tracing::warn!(volume, tag = %old.name, error = %e, "could not delete an old policy tag");
            }
        }
    }

    fn run_log_rules(&self) {
        let mut followers: Vec<(LogRule, Follower, bool)> = self
            .settings
            .log_rules
            .iter()
            .map(|r| (r.clone(), Follower::new(&r.file), false))
            .collect();
        while !self.stop.load(Ordering::SeqCst) {
            for (rule, follower, warned) in &mut followers {
                let lines = follower.poll();
                if follower.missing && !*warned {
                    tracing::warn!(rule = %rule.name, file = %rule.file.display(), "log file does not exist (yet); it is picked up when it appears");
                }
                *warned = follower.missing;
                for line in lines {
                    if let Some(prefix) = rule.matches(&line) {
                        let name = timed_name(&format!("log:{prefix}"), self.now(), true);
                        let note: String = line.chars().take(200).collect();
                        for volume in self.host.volumes_of(&rule.target) {
                            let body = TagBody::new(Source::Log, Consistency::Crash, &note)
                                .from_origin(&rule.name);
                            match self.host.tag_now(&volume, &name, body) {
                                Ok(tag) => {
                                    tracing::info!(volume = %volume, tag = %name, seq = tag.seq, "log tag")
                                }
                                Err(e) => {
                                    tracing::warn!(volume = %volume, tag = %name, error = %e, "log rule could not tag")
                                }
                            }
                        }
                    }
                }
            }
            std::thread::sleep(TICK);
        }
    }

    /// Tags the point before an anomaly: `tag:NAME` is the burst's first
    /// write (after the last flush before it), `before:NAME` the last
    /// clean flush point.
    fn tag_alarm(&self, alarm: &Alarm) {
        let (point, point_time) = match self.host.last_flush_before(&alarm.volume, alarm.first_seq)
        {
            Some((flush, at)) => (flush + 1, Some(at)),
            None => (alarm.first_seq, None),
        };
        let name = timed_name(&format!("anomaly:{}", alarm.kind), self.now(), true);
        let mut body = TagBody::new(Source::Anomaly, Consistency::Unknown, &alarm.detail)
            .from_origin(alarm.kind);
        // Shown as the time of the clean point it follows (the burst's
        // first write came after it).
        body.point_ns = point_time.map(|t| t.as_nanos());
        match self.host.tag_at(&alarm.volume, &name, point, body) {
            Ok(_) => {
                tracing::warn!(volume = %alarm.volume, tag = %name, seq = point, detail = %alarm.detail, "anomaly: tagged the point before it; roll back with before:{name}")
            }
            Err(e) => {
                tracing::error!(volume = %alarm.volume, error = %e, "anomaly found but not tagged")
            }
        }
    }

    /// The hook for `volume` (its own, or its group's).
    pub fn hook_for(&self, volume: &str) -> Option<&Hook> {
        let group = self.host.group_of(volume);
        self.settings.hooks.iter().find(|h| match &h.target {
            Target::Volume(v) => v == volume,
            Target::Group(g) => group.as_deref() == Some(g.as_str()),
        })
    }

    /// An app-consistent tag: freeze, flush and tag, thaw (always).
    pub fn app_consistent_tag(&self, volume: &str, name: &str, note: &str) -> Result<Tag, String> {
        let hook = self.hook_for(volume).ok_or_else(|| {
            format!("volume {volume}: --app-consistent needs a [[tagging.hook]] for it (freeze and thaw commands), and none is configured")
        })?;
        app_consistent(hook, || {
            self.host.tag_now(
                volume,
                name,
                TagBody::new(Source::Hook, Consistency::App, note),
            )
        })
    }

    /// Checks the point of tag `name` and records the result on the tag.
    pub fn verify(&self, volume: &str, name: &str, command: Option<&str>) -> Result<Tag, String> {
        let tag = self
            .host
            .tags(volume)?
            .into_iter()
            .find(|t| t.name == name)
            .ok_or_else(|| format!("volume {volume} has no tag named {name:?}"))?;
        let check = match command {
            Some(c) if !c.trim().is_empty() => Check::Command(c.to_string()),
            _ => Check::Fsck,
        };
        let (uri, guard) = self.host.check_export(volume, tag.seq)?;
        let scratch = self
            .settings
            .state_dir
            .join("verify")
            .join(format!("{volume}-{}", tag.body.id));
        let outcome = run_check(&check, &uri, &scratch, self.settings.verify_timeout);
        drop(guard);
        let mut body = tag.body.clone();
        body.verified = if outcome.passed {
            Verified::Passed
        } else {
            Verified::Failed
        };
        body.point = Some(tag.seq);
        body.point_ns = Some(tag.time.as_nanos());
        body.verification = Some(Verification {
            at: Timestamp::now().to_string(),
            ran: outcome.ran,
            detail: outcome.detail,
        });
        tracing::info!(volume, tag = name, passed = outcome.passed, "verified");
        self.host.tag_at(volume, name, tag.seq, body)
    }

    fn verify_in_background(self: &Arc<Self>, volume: &str, name: &str) {
        let tagger = self.clone();
        let (volume, name) = (volume.to_string(), name.to_string());
        std::thread::spawn(move || {
            if let Err(e) = tagger.verify(&volume, &name, None) {
                tracing::warn!(volume = %volume, tag = %name, error = %e, "verification could not run");
            }
        });
    }
}
