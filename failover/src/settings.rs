//! The `[failover]` settings, as the daemon's configuration gives them.

use std::time::Duration;

use crate::detector::DetectorSettings;
use crate::probe::ProbeKind;
use crate::witness::WitnessSettings;

/// Where a takeover promotes the group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromoteAt {
    /// The newest point the replica holds.
    Latest,
    /// The newest tag whose verification passed.
    LastVerified,
    /// Before an anomaly tag raised within `anomaly_window` of the
    /// takeover (so a ransomware burst that replicated is not promoted);
    /// the newest point when there is none.
    BeforeAnomaly,
}

impl std::str::FromStr for PromoteAt {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "latest" => Ok(PromoteAt::Latest),
            "last-verified" => Ok(PromoteAt::LastVerified),
            "before-anomaly" => Ok(PromoteAt::BeforeAnomaly),
            other => Err(format!(
                "promote_at = {other:?} must be \"latest\", \"last-verified\" or \"before-anomaly\""
            )),
        }
    }
}

impl PromoteAt {
    /// The configured word.
    pub fn as_str(self) -> &'static str {
        match self {
            PromoteAt::Latest => "latest",
            PromoteAt::LastVerified => "last-verified",
            PromoteAt::BeforeAnomaly => "before-anomaly",
        }
    }
}

/// One application-level probe (`[[failover.probe]]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSettings {
    /// What it checks.
    pub kind: ProbeKind,
    /// How often.
    pub interval: Duration,
    /// Failures in a row that say "down".
    pub failures: u32,
    /// How long one check may take.
    pub timeout: Duration,
}

/// One custom trigger (`[[failover.trigger]]`): a command whose non-zero
/// exit says "take over".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TriggerSettings {
    /// Run by `sh -c`.
    pub command: String,
    /// How often.
    pub interval: Duration,
    /// How long one run may take (longer counts as "no verdict").
    pub timeout: Duration,
}

/// One step of the takeover plan (`[[failover.plan]]`): a group, then
/// what to wait for before the next step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanStep {
    /// The consistency group promoted in this step.
    pub group: String,
    /// A fixed wait after it.
    pub then_wait: Option<Duration>,
    /// A probe that must pass after it (e.g. the database accepting
    /// connections) before the next step...
    pub then_probe: Option<ProbeKind>,
    /// ...within this long (then the plan goes on, with a warning).
    pub then_timeout: Duration,
}

/// The `[failover]` settings.
#[derive(Clone, Debug)]
pub struct FailoverSettings {
    /// Take over without an operator (host, app or custom trigger).
    pub auto: bool,
    /// The heartbeat interval this site asks primaries for.
    pub heartbeat: Duration,
    /// The failure detector.
    pub detector: DetectorSettings,
    /// Run after a promotion, with the NBD URI in `$TIDEMARK_URI`.
    pub takeover_hook: Option<String>,
    /// Where a takeover promotes.
    pub promote_at: PromoteAt,
    /// How far back before a takeover an anomaly tag counts.
    pub anomaly_window: Duration,
    /// Application-level probes of the primary's service.
    pub probes: Vec<ProbeSettings>,
    /// Custom triggers.
    pub triggers: Vec<TriggerSettings>,
    /// The witness, if any: takeovers and a primary's writes then need it.
    pub witness: Option<WitnessSettings>,
    /// The order groups are taken over in, when more than one is.
    pub plan: Vec<PlanStep>,
}

impl Default for FailoverSettings {
    fn default() -> Self {
        FailoverSettings {
            auto: false,
            heartbeat: Duration::from_millis(200),
            detector: DetectorSettings::default(),
            takeover_hook: None,
            promote_at: PromoteAt::Latest,
            anomaly_window: Duration::from_secs(3600),
            probes: Vec::new(),
            triggers: Vec::new(),
            witness: None,
            plan: Vec::new(),
        }
    }
}
