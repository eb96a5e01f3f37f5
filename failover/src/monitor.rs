//! One replica site's watch over its primaries. Every message a primary
//! streams here (records or heartbeats) feeds that group's failure
//! detector; the configured probes check the protected service and the
//! triggers ask the operator's commands. When `auto` is set, a detector
//! that passes its threshold, a probe that fails `failures` times in a
//! row, or a trigger that exits non-zero becomes a [`Decision`] for the
//! daemon to carry out. Without `auto` they are only reported.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tidemark_journal::Seq;
use tokio::sync::{mpsc, watch};

use crate::detector::PhiAccrual;
use crate::probe::{self, ProbeRecord};
use crate::settings::FailoverSettings;

/// A takeover to carry out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The group whose primary is down; None: every group kept here as a
    /// replica (a probe or trigger judges the service, not one stream).
    pub group: Option<String>,
    /// Which detector decided: `host`, `probe` or `trigger`.
    pub detector: &'static str,
    /// Why, in a sentence.
    pub reason: String,
}

/// What one group's primary has told this site.
#[derive(Debug)]
struct Watched {
    detector: PhiAccrual,
    /// The primary's newest seq as it last said (its heartbeats carry it).
    primary_newest: Seq,
    /// A decision was made since the last message: not again.
    decided: bool,
    /// Something was heard from the primary (not only assumed at start).
    heard: bool,
}

impl Watched {
    /// Nothing heard, nothing decided.
    fn new(settings: &FailoverSettings) -> Self {
        Watched {
            detector: PhiAccrual::new(settings.detector),
            primary_newest: 0,
            decided: false,
            heard: false,
        }
    }
}

/// One probe's state, for status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeStatus {
    /// `tcp`, `http`, `command` or `trigger`.
    pub kind: String,
    /// What it checks.
    pub target: String,
    /// Failures in a row.
    pub failures_in_a_row: u32,
    /// Failures in a row that say down (1 for triggers).
    pub failures: u32,
    /// The last failure, while failing.
    pub last_error: Option<String>,
}

/// The watch as `status --json` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct MonitorStatus {
    /// Takeovers happen without an operator.
    pub auto: bool,
    /// The highest suspicion over the watched groups (0 with none).
    pub phi: f64,
    /// Seconds since the last message from a primary (None: none yet).
    pub last_heartbeat_seconds: Option<f64>,
    /// Probes and triggers.
    pub probes: Vec<ProbeStatus>,
}

/// The watch.
#[derive(Debug)]
pub struct Monitor {
    settings: FailoverSettings,
    start: Instant,
    groups: Mutex<HashMap<String, Watched>>,
    checks: Mutex<Vec<ProbeStatus>>,
    decisions: mpsc::UnboundedSender<Decision>,
}

impl Monitor {
    /// A watch with nothing watched yet, and where its decisions arrive.
    pub fn new(settings: FailoverSettings) -> (Arc<Monitor>, mpsc::UnboundedReceiver<Decision>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut checks: Vec<ProbeStatus> = settings
            .probes
            .iter()
            .map(|p| ProbeStatus {
                kind: p.kind.name().to_string(),
                target: p.kind.target().to_string(),
                failures_in_a_row: 0,
                failures: p.failures.max(1),
                last_error: None,
            })
            .collect();
        checks.extend(settings.triggers.iter().map(|t| ProbeStatus {
            kind: "trigger".to_string(),
            target: t.command.clone(),
            failures_in_a_row: 0,
            failures: 1,
            last_error: None,
        }));
        let monitor = Arc::new(Monitor {
            settings,
            start: Instant::now(),
            groups: Mutex::new(HashMap::new()),
            checks: Mutex::new(checks),
            decisions: tx,
        });
        (monitor, rx)
    }

    /// The settings it watches with.
    pub fn settings(&self) -> &FailoverSettings {
        &self.settings
    }

    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// The primary of `group` said something; `newest` is its newest seq
    /// as it says (0 if the message does not say).
    pub fn heard(&self, group: &str, newest: Seq) {
        let now = self.now();
        let mut groups = self.groups.lock();
        let watched = groups
            .entry(group.to_string())
            .or_insert_with(|| Watched::new(&self.settings));
        watched.detector.heartbeat(now);
        watched.primary_newest = watched.primary_newest.max(newest);
        watched.decided = false;
        watched.heard = true;
    }

    /// Watches `group` before its primary has said anything, as if it had
    /// been heard `grace` from now: a site that starts as a replica takes
    /// over if its primary stays silent, as it would have had it never
    /// restarted — once a live primary has had `grace` to reconnect.
    pub fn watch(&self, group: &str, grace: Duration) {
        let assumed = self.now() + grace;
        self.groups
            .lock()
            .entry(group.to_string())
            .or_insert_with(|| {
                let mut watched = Watched::new(&self.settings);
                watched.detector.heartbeat(assumed);
                watched
            });
    }

    /// A decision about `group` that could not be carried out (the
    /// witness refused it): the detector may decide again.
    pub fn rearm(&self, group: &str) {
        if let Some(w) = self.groups.lock().get_mut(group) {
            w.decided = false;
        }
    }

    /// `group` is no longer watched (promoted here, or removed).
    pub fn forget(&self, group: &str) {
        self.groups.lock().remove(group);
    }

    /// The newest seq the primary of `group` last said it had.
    pub fn primary_newest(&self, group: &str) -> Option<Seq> {
        self.groups.lock().get(group).map(|w| w.primary_newest)
    }

    /// The suspicion of `group`'s primary now (0 if not watched).
    pub fn phi(&self, group: &str) -> f64 {
        let now = self.now();
        self.groups
            .lock()
            .get(group)
            .map_or(0.0, |w| w.detector.phi(now))
    }

    /// The watch now, over every group (or only `group`).
    pub fn status(&self, group: Option<&str>) -> MonitorStatus {
        let now = self.now();
        let groups = self.groups.lock();
        let watched = groups
            .iter()
            .filter(|(name, _)| group.is_none_or(|g| g == name.as_str()))
            .map(|(_, w)| w);
        let mut phi: f64 = 0.0;
        let mut last: Option<f64> = None;
        for w in watched {
            phi = phi.max(w.detector.phi(now));
            if let Some(at) = w.detector.last_heartbeat().filter(|_| w.heard) {
                let age = now.saturating_sub(at).as_secs_f64();
                last = Some(last.map_or(age, |l: f64| l.min(age)));
            }
        }
        MonitorStatus {
            auto: self.settings.auto,
            phi,
            last_heartbeat_seconds: last,
            probes: self.checks.lock().clone(),
        }
    }

    fn decide(&self, decision: Decision) {
        if self.settings.auto {
            tracing::warn!(group = ?decision.group, detector = decision.detector, reason = %decision.reason, "the primary is down: taking over");
            let _ = self.decisions.send(decision);
        } else {
            tracing::warn!(group = ?decision.group, detector = decision.detector, reason = %decision.reason, "the primary looks down; failover.auto is off, so no takeover");
        }
    }

    /// Judges every watched group's detector once.
    fn judge_detectors(&self) {
        let now = self.now();
        let threshold = self.settings.detector.threshold;
        let mut down = Vec::new();
        for (name, w) in self.groups.lock().iter_mut() {
            let phi = w.detector.phi(now);
            if !w.decided && phi >= threshold {
                w.decided = true;
                let silent = w
                    .detector
                    .last_heartbeat()
                    .map_or(0.0, |at| now.saturating_sub(at).as_secs_f64());
                let reason = if w.heard {
                    format!(
                        "no heartbeat from the primary of group {name} for {silent:.1} s (phi {phi:.1} ≥ {threshold})"
                    )
                } else {
                    format!(
                        "no word from the primary of group {name} since this site started, {:.1} s ago (phi {phi:.1} ≥ {threshold})",
                        now.as_secs_f64()
                    )
                };
                down.push(Decision {
                    group: Some(name.clone()),
                    detector: "host",
                    reason,
                });
            }
        }
        for d in down {
            self.decide(d);
        }
    }

    /// Runs the detectors, probes and triggers until `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut tasks = Vec::new();
        for (i, p) in self.settings.probes.clone().into_iter().enumerate() {
            let me = self.clone();
            tasks.push(tokio::spawn(async move {
                let mut record = ProbeRecord::default();
                let mut tick = tokio::time::interval(p.interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let result = p.kind.check(p.timeout).await;
                    let down = record.count(result, p.failures);
                    me.note(i, &record);
                    if down {
                        me.decide(Decision {
                            group: None,
                            detector: "probe",
                            reason: format!(
                                "{} probe of {} failed {} times in a row: {}",
                                p.kind.name(),
                                p.kind.target(),
                                record.failures_in_a_row,
                                record.last_error.clone().unwrap_or_default()
                            ),
                        });
                        // Counted again from zero: one decision per run of
                        // failures.
                        record = ProbeRecord::default();
                    }
                }
            }));
        }
        let offset = self.settings.probes.len();
        for (i, t) in self.settings.triggers.clone().into_iter().enumerate() {
            let me = self.clone();
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(t.interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let result =
                        match tokio::time::timeout(t.timeout, probe::run(&t.command, &[])).await {
                            Ok(r) => r,
                            // No verdict in time: not a reason to take over.
                            Err(_) => {
                                tracing::warn!(command = %t.command, "a failover trigger did not finish in {:?}", t.timeout);
                                continue;
                            }
                        };
                    let mut record = ProbeRecord::default();
                    let fired = record.count(result, 1);
                    me.note(offset + i, &record);
                    if fired {
                        me.decide(Decision {
                            group: None,
                            detector: "trigger",
                            reason: format!(
                                "trigger {:?} said take over ({})",
                                t.command,
                                record.last_error.unwrap_or_default()
                            ),
                        });
                    }
                }
            }));
        }
        let every = (self.settings.heartbeat / 4).max(Duration::from_millis(10));
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => self.judge_detectors(),
                _ = stop.changed() => break,
            }
        }
        for t in tasks {
            t.abort();
        }
    }

    fn note(&self, i: usize, record: &ProbeRecord) {
        if let Some(check) = self.checks.lock().get_mut(i) {
            check.failures_in_a_row = record.failures_in_a_row;
            check.last_error = record.last_error.clone();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::probe::ProbeKind;
    use crate::settings::{ProbeSettings, TriggerSettings};

    fn settings(auto: bool) -> FailoverSettings {
        FailoverSettings {
            auto,
            heartbeat: Duration::from_millis(20),
            detector: crate::DetectorSettings {
                threshold: 8.0,
                // Wide enough that a test thread stalled for a few hundred
                // milliseconds on a loaded machine is not a silence (phi
                // reaches 8 about 850 ms after the last heartbeat).
                min_std_dev: Duration::from_millis(100),
                acceptable_pause: Duration::from_millis(300),
                first_interval: Duration::from_millis(20),
                window: 100,
            },
            ..FailoverSettings::default()
        }
    }

    #[test]
    fn a_silent_primary_becomes_one_decision_and_only_with_auto() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            for auto in [true, false] {
                let (monitor, mut decisions) = Monitor::new(settings(auto));
                let (stop_tx, stop) = watch::channel(false);
                let run = tokio::spawn(monitor.clone().run(stop));
                for _ in 0..20 {
                    monitor.heard("g", 7);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                assert!(monitor.phi("g") < 8.0);
                assert_eq!(monitor.primary_newest("g"), Some(7));
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let status = monitor.status(None);
                assert!(status.phi >= 8.0, "{status:?}");
                assert!(status.last_heartbeat_seconds.unwrap() > 1.0);
                if auto {
                    let d = decisions.try_recv().expect("a decision");
                    assert_eq!(d.group.as_deref(), Some("g"));
                    assert_eq!(d.detector, "host");
                    assert!(d.reason.contains("no heartbeat"), "{}", d.reason);
                }
                assert!(decisions.try_recv().is_err(), "more than one decision");
                let _ = stop_tx.send(true);
                run.await.unwrap();
            }
        });
    }

    #[test]
    fn a_group_watched_from_the_start_is_judged_after_the_grace() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (monitor, mut decisions) = Monitor::new(settings(true));
            let (stop_tx, stop) = watch::channel(false);
            let run = tokio::spawn(monitor.clone().run(stop));
            monitor.watch("silent", Duration::from_millis(600));
            monitor.watch("heard", Duration::from_millis(600));
            // A live primary reconnects within the grace and is watched
            // as usual from then on.
            for _ in 0..60 {
                monitor.heard("heard", 3);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let status = monitor.status(Some("silent"));
            assert_eq!(status.last_heartbeat_seconds, None, "{status:?}");
            let d = tokio::time::timeout(Duration::from_secs(5), decisions.recv())
                .await
                .expect("a decision in time")
                .unwrap();
            assert_eq!(d.group.as_deref(), Some("silent"));
            assert!(d.reason.contains("since this site started"), "{}", d.reason);
            assert!(monitor.phi("heard") < 8.0);
            let _ = stop_tx.send(true);
            run.await.unwrap();
        });
    }

    #[test]
    fn probes_and_triggers_decide_for_every_group() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let closed = listener.local_addr().unwrap().to_string();
            drop(listener);
            let mut s = settings(true);
            s.probes.push(ProbeSettings {
                kind: ProbeKind::Tcp(closed.clone()),
                interval: Duration::from_millis(20),
                failures: 3,
                timeout: Duration::from_millis(200),
            });
            s.triggers.push(TriggerSettings {
                command: "exit 1".into(),
                interval: Duration::from_millis(50),
                timeout: Duration::from_secs(5),
            });
            let (monitor, mut decisions) = Monitor::new(s);
            let (stop_tx, stop) = watch::channel(false);
            let run = tokio::spawn(monitor.clone().run(stop));
            let mut seen = Vec::new();
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while seen.len() < 2 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "only {seen:?} decided"
                );
                let d = tokio::time::timeout(Duration::from_secs(5), decisions.recv())
                    .await
                    .expect("decisions in time")
                    .unwrap();
                if !seen.contains(&d.detector) {
                    seen.push(d.detector);
                }
                assert_eq!(d.group, None);
            }
            let status = monitor.status(None);
            assert_eq!(status.probes.len(), 2);
            assert_eq!(status.probes[0].target, closed);
            let _ = stop_tx.send(true);
            run.await.unwrap();
        });
    }
}
