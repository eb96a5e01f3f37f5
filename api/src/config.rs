//! The daemon's configuration: a TOML file (`--config`), every field
//! optional, unknown fields refused by name; command-line flags override
//! the file. Documented field by field in `docs/configuration.md`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tidemark_journal::{CacheTiers, IoMode};
use tidemark_tagging::schedule::Target;

use crate::size::parse_size;

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    data_dir: Option<PathBuf>,
    nbd: Option<String>,
    grpc: Option<String>,
    http: Option<String>,
    log: Option<String>,
    #[serde(default)]
    api: ApiFile,
    #[serde(default)]
    limits: LimitsFile,
    #[serde(default)]
    replication: ReplicationFile,
    #[serde(default)]
    failover: FailoverFile,
    #[serde(default)]
    volumes: VolumesFile,
    #[serde(default)]
    journal: JournalFile,
    #[serde(default)]
    retention: RetentionFile,
    #[serde(default)]
    tagging: TaggingFile,
    archive: Option<ArchiveFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ArchiveFile {
    url: Option<String>,
    endpoint: Option<String>,
    region: Option<String>,
    keep: Option<String>,
    upload_after: Option<String>,
    base_every: Option<String>,
    max_lag: Option<String>,
    cache: Option<String>,
    timeout: Option<String>,
}

/// The `[archive]` table.
#[derive(Clone, Debug)]
pub struct ArchiveConfig {
    /// `url`: where the archive lives.
    pub location: tidemark_replicator::archive::Location,
    /// `endpoint`, `region`, `timeout`: how to reach it.
    pub store: tidemark_replicator::archive::StoreOptions,
    /// `keep`, `upload_after`, `base_every`, `max_lag`.
    pub settings: tidemark_replicator::archive::ArchiveSettings,
    /// `cache`: bytes of chunks each view served from the archive keeps.
    pub cache_bytes: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplicationFile {
    rpo_alert: Option<String>,
    alert_command: Option<String>,
    sync_timeout: Option<String>,
    on_replica_down: Option<String>,
    verify_interval: Option<String>,
    heartbeat: Option<String>,
    max_lag: Option<String>,
    adaptive_latency: Option<String>,
    adaptive_lag: Option<String>,
    advertise: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FailoverFile {
    auto: Option<bool>,
    heartbeat: Option<String>,
    phi_threshold: Option<f64>,
    min_std_dev: Option<String>,
    acceptable_pause: Option<String>,
    takeover_hook: Option<String>,
    promote_at: Option<String>,
    anomaly_window: Option<String>,
    #[serde(default)]
    probe: Vec<ProbeFile>,
    #[serde(default)]
    trigger: Vec<TriggerFile>,
    witness: Option<WitnessFile>,
    #[serde(default)]
    plan: Vec<PlanFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    group: String,
    then_wait: Option<String>,
    /// `tcp:HOST:PORT`, `http:URL` or `command:CMD`.
    then_probe: Option<String>,
    then_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WitnessFile {
    etcd: Vec<String>,
    key: String,
    lease: Option<String>,
    grace: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProbeFile {
    kind: String,
    target: String,
    interval: Option<String>,
    failures: Option<u32>,
    timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TriggerFile {
    command: String,
    interval: Option<String>,
    timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    nbd_connections: Option<usize>,
    nbd_handshake_timeout: Option<String>,
    nbd_buffer_memory: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiFile {
    token_file: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaggingFile {
    #[serde(default)]
    schedule: Vec<ScheduleFile>,
    #[serde(default)]
    log_rule: Vec<LogRuleFile>,
    #[serde(default)]
    hook: Vec<HookFile>,
    #[serde(default)]
    anomaly: AnomalyFile,
    #[serde(default)]
    verify: VerifyFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScheduleFile {
    volume: Option<String>,
    group: Option<String>,
    cron: Option<String>,
    every: Option<String>,
    timezone: Option<String>,
    name: Option<String>,
    keep: Option<usize>,
    verify: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogRuleFile {
    volume: Option<String>,
    group: Option<String>,
    file: Option<PathBuf>,
    pattern: Option<String>,
    name: Option<String>,
    builtin: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HookFile {
    volume: Option<String>,
    group: Option<String>,
    freeze: Option<String>,
    thaw: Option<String>,
    timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AnomalyFile {
    enabled: Option<bool>,
    window: Option<String>,
    entropy_ratio: Option<f64>,
    entropy_fraction: Option<f64>,
    overwrite_fraction: Option<f64>,
    min_burst: Option<String>,
    min_regions: Option<u64>,
    replace_ratio: Option<f64>,
    usual_fraction: Option<f64>,
    learn: Option<String>,
    rate_factor: Option<f64>,
    min_rate: Option<String>,
    cooldown: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyFile {
    timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumesFile {
    default_mode: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct JournalFile {
    segment_size: Option<String>,
    max_record: Option<String>,
    memory_cache: Option<String>,
    file_cache: Option<String>,
    cache_tiers: Option<String>,
    sync_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetentionFile {
    max_age: Option<String>,
    max_bytes: Option<String>,
    interval: Option<String>,
}

/// The daemon's settings after the file and the flags.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where volumes, journals and overlays live.
    pub data_dir: PathBuf,
    /// NBD listen address.
    pub nbd: SocketAddr,
    /// gRPC listen address.
    pub grpc: SocketAddr,
    /// HTTP listen address (metrics, health).
    pub http: SocketAddr,
    /// Log filter (`info`, `tidemark=debug`, …); `RUST_LOG` wins.
    pub log: String,
    /// The API token's file; `None`: `DATA_DIR/api.token`, made if missing.
    pub token_file: Option<PathBuf>,
    /// TLS certificate and key (PEM) of the API, if it speaks TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// NBD connections open at once; more are closed at once.
    pub nbd_connections: usize,
    /// How long an NBD client may take to choose an export.
    pub nbd_handshake_timeout: Duration,
    /// Bytes of NBD request and reply buffers held at once, all
    /// connections together.
    pub nbd_buffer_memory: u64,
    /// The `[replication]` table.
    pub replication: tidemark_replicator::ReplicationSettings,
    /// The `[failover]` table.
    pub failover: tidemark_failover::FailoverSettings,
    /// `[replication] advertise`: where other sites reach this daemon's
    /// gRPC API (default: the address it listens on).
    pub advertise: Option<String>,
    /// Mode of volumes created without `--mode`.
    pub default_mode: IoMode,
    /// Segment size of new journals.
    pub segment_size: u64,
    /// Largest record.
    pub max_record: u64,
    /// Memory cache bound per consistency group.
    pub memory_cache: u64,
    /// File cache size per consistency group.
    pub file_cache: u64,
    /// Which cache tiers records wait in.
    pub cache_tiers: CacheTiers,
    /// How long a sync write waits for the journal before it fails.
    pub sync_timeout: Duration,
    /// Retention: drop history older than this.
    pub retention_max_age: Option<Duration>,
    /// Retention: keep at most this many bytes of journal per group.
    pub retention_max_bytes: Option<u64>,
    /// How often retention runs.
    pub retention_interval: Duration,
    /// The `[[tagging.*]]` tables (the daemon sets `state_dir`).
    pub tagging: tidemark_tagging::Settings,
    /// Every tagging rule's target, with the rule's name for messages
    /// (checked against the volumes at start-up).
    pub tagging_targets: Vec<(String, Target)>,
    /// The `[archive]` table, when there is one.
    pub archive: Option<ArchiveConfig>,
}

/// Flags of `tidemark serve` that override the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--nbd`.
    pub nbd: Option<String>,
    /// `--grpc`.
    pub grpc: Option<String>,
    /// `--http`.
    pub http: Option<String>,
    /// `--token-file`.
    pub token_file: Option<PathBuf>,
}

impl Config {
    /// Reads `path` (if any) and applies `overrides`.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, String> {
        let file = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
                Self::parse_file(&text)
                    .map_err(|e| format!("config file {}: {e}", path.display()))?
            }
            None => File::default(),
        };
        Self::from_file(file, overrides)
    }

    /// Parses configuration text (for tests and `load`).
    pub fn parse(text: &str, overrides: &Overrides) -> Result<Config, String> {
        Self::from_file(Self::parse_file(text)?, overrides)
    }

    fn parse_file(text: &str) -> Result<File, String> {
        toml::from_str(text).map_err(|e| e.message().to_string() + &location(text, e.span()))
    }

    fn from_file(file: File, o: &Overrides) -> Result<Config, String> {
        let addr = |field: &str, flag: &Option<String>, value: &Option<String>, default: &str| {
            let text = flag.as_deref().or(value.as_deref()).unwrap_or(default);
            text.parse::<SocketAddr>().map_err(|_| {
                format!(
                    "{field} = {text:?} is not an address like 127.0.0.1:{}",
                    default.rsplit(':').next().unwrap_or("0")
                )
            })
        };
        let size = |field: &str, value: &Option<String>, default: u64| match value {
            Some(text) => parse_size(text).map_err(|e| format!("{field}: {e}")),
            None => Ok(default),
        };
        let j = &file.journal;
        let r = &file.retention;
        let cache_tiers = match j.cache_tiers.as_deref().unwrap_or("both") {
            "memory" => CacheTiers::Memory,
            "file" => CacheTiers::File,
            "both" => CacheTiers::Both,
            other => {
                return Err(format!(
                    "journal.cache_tiers = {other:?} must be \"memory\", \"file\" or \"both\""
                ))
            }
        };
        let default_mode = match file.volumes.default_mode.as_deref() {
            None => IoMode::Sync,
            Some(text) => parse_mode(text).map_err(|e| format!("volumes.default_mode: {e}"))?,
        };
        let (tagging, tagging_targets) = tagging(&file.tagging)?;
        let tls = match (&file.api.tls_cert, &file.api.tls_key) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            (None, None) => None,
            (Some(_), None) => return Err("api.tls_cert is set but api.tls_key is missing".into()),
            (None, Some(_)) => return Err("api.tls_key is set but api.tls_cert is missing".into()),
        };
        let l = &file.limits;
        let nbd_buffer_memory = size("limits.nbd_buffer_memory", &l.nbd_buffer_memory, 256 << 20)?;
        if nbd_buffer_memory < 32 << 20 {
            return Err(format!(
                "limits.nbd_buffer_memory = {nbd_buffer_memory} bytes is below 32M, the largest NBD request"
            ));
        }
        let nbd_connections = l.nbd_connections.unwrap_or(128);
        if nbd_connections == 0 {
            return Err("limits.nbd_connections = 0 would refuse every NBD client".into());
        }
        let rf = &file.replication;
        let defaults = tidemark_replicator::ReplicationSettings::default();
        let replication = tidemark_replicator::ReplicationSettings {
            sync_timeout: duration("replication.sync_timeout", &rf.sync_timeout)?
                .unwrap_or(defaults.sync_timeout),
            on_replica_down: match rf.on_replica_down.as_deref() {
                Some(text) => text.parse().map_err(|e| format!("replication.{e}"))?,
                None => defaults.on_replica_down,
            },
            rpo_alert: duration("replication.rpo_alert", &rf.rpo_alert)?,
            alert_command: rf.alert_command.clone().filter(|c| !c.trim().is_empty()),
            heartbeat: duration("replication.heartbeat", &rf.heartbeat)?
                .unwrap_or(defaults.heartbeat),
            max_lag_bytes: size("replication.max_lag", &rf.max_lag, defaults.max_lag_bytes)?,
            adaptive_latency: duration("replication.adaptive_latency", &rf.adaptive_latency)?
                .unwrap_or(defaults.adaptive_latency),
            adaptive_lag: duration("replication.adaptive_lag", &rf.adaptive_lag)?
                .unwrap_or(defaults.adaptive_lag),
            verify_interval: duration("replication.verify_interval", &rf.verify_interval)?,
        };
        if replication.heartbeat.is_zero() {
            return Err("replication.heartbeat must be longer than 0".into());
        }
        let failover = failover_settings(&file.failover)?;
        let advertise = rf.advertise.clone().filter(|a| !a.trim().is_empty());
        let archive = match &file.archive {
            None => None,
            Some(a) => {
                let url = a
                    .url
                    .as_deref()
                    .ok_or("[archive] needs url = \"s3://BUCKET/PREFIX\"")?;
                let location = tidemark_replicator::archive::Location::parse(url)
                    .map_err(|e| format!("archive.url: {e}"))?;
                let defaults = tidemark_replicator::archive::ArchiveSettings::default();
                let settings = tidemark_replicator::archive::ArchiveSettings {
                    keep: duration("archive.keep", &a.keep)?,
                    upload_after: duration("archive.upload_after", &a.upload_after)?
                        .unwrap_or(defaults.upload_after),
                    base_every: duration("archive.base_every", &a.base_every)?
                        .unwrap_or(defaults.base_every),
                    max_lag_bytes: size("archive.max_lag", &a.max_lag, defaults.max_lag_bytes)?,
                    ..defaults
                };
                if settings.keep.is_some_and(|k| k < settings.base_every) {
                    return Err(
                        "archive.keep is shorter than archive.base_every: nothing could ever be deleted"
                            .into(),
                    );
                }
                Some(ArchiveConfig {
                    location,
                    store: tidemark_replicator::archive::StoreOptions {
                        endpoint: a.endpoint.clone().filter(|e| !e.trim().is_empty()),
                        region: a.region.clone().filter(|r| !r.trim().is_empty()),
                        timeout: duration("archive.timeout", &a.timeout)?,
                    },
                    settings,
                    cache_bytes: size("archive.cache", &a.cache, 256 << 20)?,
                })
            }
        };
        Ok(Config {
            archive,
            advertise,
            replication,
            failover,
            token_file: o.token_file.clone().or(file.api.token_file),
            tls,
            nbd_connections,
            nbd_handshake_timeout: duration(
                "limits.nbd_handshake_timeout",
                &l.nbd_handshake_timeout,
            )?
            .unwrap_or(Duration::from_secs(10)),
            nbd_buffer_memory,
            tagging,
            tagging_targets,
            data_dir: o
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("./tidemark-data")),
            nbd: addr("nbd", &o.nbd, &file.nbd, "127.0.0.1:10809")?,
            grpc: addr("grpc", &o.grpc, &file.grpc, "127.0.0.1:7700")?,
            http: addr("http", &o.http, &file.http, "127.0.0.1:7701")?,
            log: file.log.unwrap_or_else(|| "info".into()),
            default_mode,
            segment_size: size("journal.segment_size", &j.segment_size, 64 << 20)?,
            max_record: size("journal.max_record", &j.max_record, 32 << 20)?,
            memory_cache: size("journal.memory_cache", &j.memory_cache, 128 << 20)?,
            file_cache: size("journal.file_cache", &j.file_cache, 4 << 30)?,
            cache_tiers,
            sync_timeout: duration("journal.sync_timeout", &j.sync_timeout)?
                .unwrap_or(Duration::from_secs(30)),
            retention_max_age: duration("retention.max_age", &r.max_age)?,
            retention_max_bytes: r
                .max_bytes
                .as_deref()
                .map(|t| parse_size(t).map_err(|e| format!("retention.max_bytes: {e}")))
                .transpose()?,
            retention_interval: duration("retention.interval", &r.interval)?
                .unwrap_or(Duration::from_secs(60)),
        })
    }
}

/// `[[TABLE]] #N (name "X")`, for messages.
fn rule_label(table: &str, n: usize, name: Option<&str>) -> String {
    match name {
        Some(name) => format!("[[{table}]] #{n} (name {name:?})"),
        None => format!("[[{table}]] #{n}"),
    }
}

fn target(label: &str, volume: &Option<String>, group: &Option<String>) -> Result<Target, String> {
    match (volume, group) {
        (Some(v), None) => Ok(Target::Volume(v.clone())),
        (None, Some(g)) => Ok(Target::Group(g.clone())),
        (Some(_), Some(_)) => Err(format!("{label}: give volume or group, not both")),
        (None, None) => Err(format!("{label}: volume (or group) is missing")),
    }
}

/// The tagging tables, checked field by field.
fn tagging(
    file: &TaggingFile,
) -> Result<(tidemark_tagging::Settings, Vec<(String, Target)>), String> {
    use tidemark_tagging::hooks::{command_exists, Hook};
    use tidemark_tagging::log_watch::{builtin, LogRule};
    use tidemark_tagging::schedule::{Policy, When, Zone};
    let mut settings = tidemark_tagging::Settings {
        verify_timeout: Duration::from_secs(600),
        ..Default::default()
    };
    let mut targets = Vec::new();
    for (i, s) in file.schedule.iter().enumerate() {
        let label = rule_label("tagging.schedule", i + 1, s.name.as_deref());
        let name = s
            .name
            .clone()
            .ok_or_else(|| format!("{label}: name is missing"))?;
        let target = target(&label, &s.volume, &s.group)?;
        let zone = match &s.timezone {
            Some(tz) => Zone::parse(tz).map_err(|e| format!("{label}: timezone = {tz:?}: {e}"))?,
            None => Zone::Utc,
        };
        let when = match (&s.cron, &s.every) {
            (Some(cron), None) => {
                When::cron(cron, zone).map_err(|e| format!("{label}: cron = {cron:?}: {e}"))?
            }
            (None, Some(every)) => parse_duration(every)
                .and_then(When::every)
                .map_err(|e| format!("{label}: every = {every:?}: {e}"))?,
            (Some(_), Some(_)) => return Err(format!("{label}: give cron or every, not both")),
            (None, None) => return Err(format!("{label}: cron (or every) is missing")),
        };
        if s.keep == Some(0) {
            return Err(format!("{label}: keep = 0 would delete every tag it makes"));
        }
        targets.push((label, target.clone()));
        settings.policies.push(Policy {
            name,
            target,
            when,
            keep: s.keep,
            verify: s.verify.unwrap_or(false),
        });
    }
    for (i, r) in file.log_rule.iter().enumerate() {
        let label = rule_label("tagging.log_rule", i + 1, r.name.as_deref());
        let target = target(&label, &r.volume, &r.group)?;
        let file_path = r
            .file
            .clone()
            .ok_or_else(|| format!("{label}: file is missing"))?;
        let patterns = match (&r.pattern, &r.builtin) {
            (Some(pattern), None) => {
                let name = r
                    .name
                    .clone()
                    .ok_or_else(|| format!("{label}: name is missing (it names the tags)"))?;
                let re = regex::Regex::new(pattern).map_err(|e| {
                    format!("{label}: pattern = {pattern:?} is not a valid regular expression: {e}")
                })?;
                vec![(name, re)]
            }
            (None, Some(set)) => {
                builtin(set).map_err(|e| format!("{label}: builtin = {set:?}: {e}"))?
            }
            (Some(_), Some(_)) => {
                return Err(format!("{label}: give pattern or builtin, not both"))
            }
            (None, None) => return Err(format!("{label}: pattern (or builtin) is missing")),
        };
        targets.push((label.clone(), target.clone()));
        settings.log_rules.push(LogRule {
            name: r
                .name
                .clone()
                .or_else(|| r.builtin.clone())
                .unwrap_or(label),
            target,
            file: file_path,
            patterns,
        });
    }
    for (i, h) in file.hook.iter().enumerate() {
        let label = rule_label("tagging.hook", i + 1, None);
        let target = target(&label, &h.volume, &h.group)?;
        let command = |field: &str, value: &Option<String>| -> Result<String, String> {
            let value = value
                .clone()
                .ok_or_else(|| format!("{label}: {field} is missing"))?;
            command_exists(&value).map_err(|e| format!("{label}: {field} = {value:?}: {e}"))?;
            Ok(value)
        };
        let freeze = command("freeze", &h.freeze)?;
        let thaw = command("thaw", &h.thaw)?;
        let timeout = match &h.timeout {
            Some(t) => parse_duration(t).map_err(|e| format!("{label}: timeout = {t:?}: {e}"))?,
            None => Duration::from_secs(30),
        };
        targets.push((label, target.clone()));
        settings.hooks.push(Hook {
            target,
            freeze,
            thaw,
            timeout,
        });
    }
    let a = &file.anomaly;
    let defaults = tidemark_tagging::anomaly::AnomalySettings::default();
    let fraction = |field: &str, value: Option<f64>, default: f64| match value {
        Some(x) if !(0.0..=1.0).contains(&x) => Err(format!(
            "tagging.anomaly.{field} = {x} must be between 0 and 1"
        )),
        Some(x) => Ok(x),
        None => Ok(default),
    };
    let dur = |field: &str, value: &Option<String>, default: Duration| match value {
        Some(t) => parse_duration(t).map_err(|e| format!("tagging.anomaly.{field} = {t:?}: {e}")),
        None => Ok(default),
    };
    let bytes = |field: &str, value: &Option<String>, default: u64| match value {
        Some(t) => parse_size(t).map_err(|e| format!("tagging.anomaly.{field} = {t:?}: {e}")),
        None => Ok(default),
    };
    settings.anomaly = tidemark_tagging::anomaly::AnomalySettings {
        enabled: a.enabled.unwrap_or(defaults.enabled),
        window: dur("window", &a.window, defaults.window)?,
        entropy_ratio: fraction("entropy_ratio", a.entropy_ratio, defaults.entropy_ratio)?,
        entropy_fraction: fraction(
            "entropy_fraction",
            a.entropy_fraction,
            defaults.entropy_fraction,
        )?,
        overwrite_fraction: fraction(
            "overwrite_fraction",
            a.overwrite_fraction,
            defaults.overwrite_fraction,
        )?,
        min_burst_bytes: bytes("min_burst", &a.min_burst, defaults.min_burst_bytes)?,
        min_regions: a.min_regions.unwrap_or(defaults.min_regions),
        replace_ratio: match a.replace_ratio {
            Some(x) if x.is_nan() || x < 1.0 => {
                return Err(format!(
                    "tagging.anomaly.replace_ratio = {x} must be at least 1"
                ))
            }
            Some(x) => x,
            None => defaults.replace_ratio,
        },
        usual_fraction: fraction("usual_fraction", a.usual_fraction, defaults.usual_fraction)?,
        learn_bytes: bytes("learn", &a.learn, defaults.learn_bytes)?,
        rate_factor: a.rate_factor.unwrap_or(defaults.rate_factor),
        min_rate_bytes: bytes("min_rate", &a.min_rate, defaults.min_rate_bytes)?,
        cooldown: dur("cooldown", &a.cooldown, defaults.cooldown)?,
    };
    if let Some(t) = &file.verify.timeout {
        settings.verify_timeout =
            parse_duration(t).map_err(|e| format!("tagging.verify.timeout = {t:?}: {e}"))?;
    }
    Ok((settings, targets))
}

/// `sync`, `async` or `adaptive`.
pub fn parse_mode(text: &str) -> Result<IoMode, String> {
    match text {
        "sync" => Ok(IoMode::Sync),
        "async" => Ok(IoMode::Async),
        "adaptive" => Ok(IoMode::Adaptive),
        other => Err(format!(
            "mode {other:?} must be \"sync\", \"async\" or \"adaptive\""
        )),
    }
}

/// `30s`, `5m`, `2h`, `7d`, `250ms`, `1h30m` (the syntax of relative
/// points, without the minus).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    crate::point_spec::parse_duration(text.trim()).ok_or_else(|| {
        format!("duration {text:?} must be a number and a unit: ms, s, m, h or d (30s, 5m, 2h, 7d)")
    })
}

/// " (line N, column M)" for a span of `text`.
fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else {
        return String::new();
    };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!(" (line {line}, column {column})")
}

/// An optional duration of the file, with its field named in the error.
fn duration(field: &str, value: &Option<String>) -> Result<Option<Duration>, String> {
    value
        .as_deref()
        .map(|text| parse_duration(text).map_err(|e| format!("{field}: {e}")))
        .transpose()
}

/// The `[failover]` table, checked.
fn failover_settings(f: &FailoverFile) -> Result<tidemark_failover::FailoverSettings, String> {
    use tidemark_failover::probe::ProbeKind;
    use tidemark_failover::{FailoverSettings, ProbeSettings, TriggerSettings};
    let defaults = FailoverSettings::default();
    let heartbeat = duration("failover.heartbeat", &f.heartbeat)?.unwrap_or(defaults.heartbeat);
    if heartbeat.is_zero() {
        return Err("failover.heartbeat must be longer than 0".into());
    }
    let mut detector = defaults.detector;
    detector.first_interval = heartbeat;
    if let Some(phi) = f.phi_threshold {
        if !(phi.is_finite() && phi > 0.0) {
            return Err(format!(
                "failover.phi_threshold = {phi} must be a positive number"
            ));
        }
        detector.threshold = phi;
    }
    if let Some(d) = duration("failover.min_std_dev", &f.min_std_dev)? {
        detector.min_std_dev = d;
    }
    if let Some(d) = duration("failover.acceptable_pause", &f.acceptable_pause)? {
        detector.acceptable_pause = d;
    }
    let promote_at = match f.promote_at.as_deref() {
        Some(text) => text.parse().map_err(|e| format!("failover.{e}"))?,
        None => defaults.promote_at,
    };
    let mut probes = Vec::new();
    for (i, p) in f.probe.iter().enumerate() {
        let at = format!("failover.probe[{i}]");
        let kind = ProbeKind::parse(&p.kind, &p.target).map_err(|e| format!("{at}: {e}"))?;
        let interval = duration(&format!("{at}.interval"), &p.interval)?
            .unwrap_or(std::time::Duration::from_secs(1));
        if interval.is_zero() {
            return Err(format!("{at}.interval must be longer than 0"));
        }
        let failures = p.failures.unwrap_or(3);
        if failures == 0 {
            return Err(format!(
                "{at}.failures = 0: a probe must fail at least once to count"
            ));
        }
        probes.push(ProbeSettings {
            kind,
            interval,
            failures,
            timeout: duration(&format!("{at}.timeout"), &p.timeout)?.unwrap_or(interval),
        });
    }
    let mut triggers = Vec::new();
    for (i, t) in f.trigger.iter().enumerate() {
        let at = format!("failover.trigger[{i}]");
        if t.command.trim().is_empty() {
            return Err(format!("{at}.command is empty"));
        }
        let interval = duration(&format!("{at}.interval"), &t.interval)?
            .unwrap_or(std::time::Duration::from_secs(5));
        if interval.is_zero() {
            return Err(format!("{at}.interval must be longer than 0"));
        }
        triggers.push(TriggerSettings {
            command: t.command.clone(),
            interval,
            timeout: duration(&format!("{at}.timeout"), &t.timeout)?.unwrap_or(interval),
        });
    }
    let witness = match &f.witness {
        None => None,
        Some(w) => {
            if w.etcd.is_empty() {
                return Err("failover.witness.etcd needs at least one endpoint".into());
            }
            for e in &w.etcd {
                if !(e.starts_with("http://") || e.starts_with("https://")) {
                    return Err(format!(
                        "failover.witness.etcd endpoint {e:?} must start with http:// or https://"
                    ));
                }
            }
            if w.key.trim().is_empty() {
                return Err("failover.witness.key is empty".into());
            }
            let lease = duration("failover.witness.lease", &w.lease)?
                .unwrap_or(std::time::Duration::from_secs(5));
            let grace = duration("failover.witness.grace", &w.grace)?.unwrap_or(lease / 5);
            if lease < std::time::Duration::from_secs(2) {
                return Err(format!(
                    "failover.witness.lease = {lease:?} is below etcd's 2 s minimum"
                ));
            }
            if grace >= lease {
                return Err(format!(
                    "failover.witness.grace = {grace:?} must be shorter than the lease ({lease:?})"
                ));
            }
            Some(tidemark_failover::WitnessSettings {
                endpoints: w.etcd.clone(),
                key: w.key.clone(),
                lease,
                grace,
            })
        }
    };
    let mut plan = Vec::new();
    for (i, step) in f.plan.iter().enumerate() {
        let at = format!("failover.plan[{i}]");
        if step.group.trim().is_empty() {
            return Err(format!("{at}.group is empty"));
        }
        if plan
            .iter()
            .any(|s: &tidemark_failover::PlanStep| s.group == step.group)
        {
            return Err(format!("{at}: group {} is in the plan twice", step.group));
        }
        let then_probe = match step.then_probe.as_deref() {
            None => None,
            Some(text) => {
                let (kind, target) = text.split_once(':').ok_or_else(|| {
                    format!(
                        "{at}.then_probe = {text:?} must be tcp:HOST:PORT, http:URL or command:CMD"
                    )
                })?;
                Some(ProbeKind::parse(kind, target).map_err(|e| format!("{at}.then_probe: {e}"))?)
            }
        };
        plan.push(tidemark_failover::PlanStep {
            group: step.group.clone(),
            then_wait: duration(&format!("{at}.then_wait"), &step.then_wait)?,
            then_probe,
            then_timeout: duration(&format!("{at}.then_timeout"), &step.then_timeout)?
                .unwrap_or(std::time::Duration::from_secs(60)),
        });
    }
    Ok(FailoverSettings {
        plan,
        witness,
        auto: f.auto.unwrap_or(false),
        heartbeat,
        detector,
        takeover_hook: f.takeover_hook.clone().filter(|c| !c.trim().is_empty()),
        promote_at,
        anomaly_window: duration("failover.anomaly_window", &f.anomaly_window)?
            .unwrap_or(defaults.anomaly_window),
        probes,
        triggers,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_gives_the_documented_defaults() {
        let c = Config::parse("", &Overrides::default()).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("./tidemark-data"));
        assert_eq!(c.nbd.to_string(), "127.0.0.1:10809");
        assert_eq!(c.grpc.to_string(), "127.0.0.1:7700");
        assert_eq!(c.http.to_string(), "127.0.0.1:7701");
        assert_eq!(c.default_mode, IoMode::Sync);
        assert_eq!(c.memory_cache, 128 << 20);
        assert_eq!(c.file_cache, 4 << 30);
    }

    #[test]
    fn the_archive_table_parses_and_bad_values_name_the_field() {
        let c = Config::parse(
            "[archive]\nurl = \"s3://bucket/site-a\"\nendpoint = \"http://127.0.0.1:9000\"\nkeep = \"90d\"\nupload_after = \"5s\"\n",
            &Overrides::default(),
        )
        .unwrap();
        let a = c.archive.unwrap();
        assert_eq!(a.location.to_string(), "s3://bucket/site-a");
        assert_eq!(a.store.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(a.settings.keep, Some(Duration::from_secs(90 * 86400)));
        assert_eq!(a.settings.upload_after, Duration::from_secs(5));
        assert!(Config::parse("", &Overrides::default())
            .unwrap()
            .archive
            .is_none());
        for (text, named) in [
            ("[archive]\nendpoint = \"x\"\n", "url"),
            ("[archive]\nurl = \"ftp://x\"\n", "archive.url"),
            (
                "[archive]\nurl = \"s3://bucket\"\nkeep = \"soon\"\n",
                "archive.keep",
            ),
            (
                "[archive]\nurl = \"s3://bucket\"\nbucket = \"b\"\n",
                "bucket",
            ),
        ] {
            let e = Config::parse(text, &Overrides::default()).unwrap_err();
            assert!(e.contains(named), "{text}: {e}");
        }
    }

    #[test]
    fn flags_override_the_file() {
        let text = "nbd = \"127.0.0.1:1\"\ndata_dir = \"/a\"\n";
        let o = Overrides {
            nbd: Some("127.0.0.1:2".into()),
            ..Overrides::default()
        };
        let c = Config::parse(text, &o).unwrap();
        assert_eq!(c.nbd.port(), 2);
        assert_eq!(c.data_dir, PathBuf::from("/a"));
    }

    #[test]
    fn unknown_fields_are_named() {
        let err =
            Config::parse("[journal]\nmemroy_cache = \"1G\"\n", &Overrides::default()).unwrap_err();
        assert!(err.contains("memroy_cache"), "{err}");
        assert!(err.contains("line 2"), "{err}");
        let err = Config::parse("colour = 1\n", &Overrides::default()).unwrap_err();
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn tagging_tables_parse_and_bad_ones_name_table_field_and_value() {
        let good = r#"
[[tagging.schedule]]
volume = "db"
cron = "0 22 * * *"
timezone = "Europe/Berlin"
name = "nightly"
keep = 30

[[tagging.log_rule]]
volume = "db"
file = "/var/log/postgresql/postgresql-15-main.log"
builtin = "postgresql"

[[tagging.hook]]
group = "pg"
freeze = "sh -c true"
thaw = "sh -c true"
timeout = "30s"

[tagging.anomaly]
enabled = true
min_regions = 64
usual_fraction = 0.3
replace_ratio = 1.5
learn = "64M"
"#;
        let c = Config::parse(good, &Overrides::default()).unwrap();
        let a = &c.tagging.anomaly;
        assert_eq!(
            (
                a.min_regions,
                a.usual_fraction,
                a.replace_ratio,
                a.learn_bytes
            ),
            (64, 0.3, 1.5, 64 << 20)
        );
        assert_eq!(c.tagging.policies.len(), 1);
        assert_eq!(c.tagging.log_rules[0].patterns.len(), 3);
        assert_eq!(c.tagging_targets.len(), 3);
        for (text, want) in [
            ("[[tagging.schedule]]\nvolume = \"db\"\ncron = \"0 25 * * *\"\nname = \"n\"\n", "[[tagging.schedule]] #1 (name \"n\"): cron = \"0 25 * * *\""),
            ("[[tagging.schedule]]\nvolume = \"db\"\ncron = \"0 22 * * *\"\ntimezone = \"Mars/Base\"\nname = \"n\"\n", "timezone = \"Mars/Base\""),
            ("[[tagging.log_rule]]\nvolume = \"db\"\nfile = \"/x\"\npattern = \"(unclosed\"\nname = \"x\"\n", "pattern = \"(unclosed\" is not a valid regular expression"),
            ("[[tagging.hook]]\nvolume = \"db\"\nfreeze = \"no-such-freezer -f\"\nthaw = \"true\"\n", "[[tagging.hook]] #1: freeze = \"no-such-freezer -f\": program \"no-such-freezer\" was not found"),
            ("[[tagging.log_rule]]\nvolume = \"db\"\nfile = \"/x\"\nbuiltin = \"oracle\"\n", "builtin = \"oracle\""),
            ("[[tagging.schedule]]\nvolume = \"db\"\ncron = \"0 22 * * *\"\nname = \"n\"\ncolour = 1\n", "colour"),
            ("[tagging.anomaly]\nentropy_fraction = 2.0\n", "tagging.anomaly.entropy_fraction = 2"),
            ("[tagging.anomaly]\nusual_fraction = 1.5\n", "tagging.anomaly.usual_fraction = 1.5"),
            ("[tagging.anomaly]\nreplace_ratio = 0.5\n", "tagging.anomaly.replace_ratio = 0.5 must be at least 1"),
            ("[tagging.anomaly]\nlearn = \"lots\"\n", "tagging.anomaly.learn = \"lots\""),
        ] {
            let err = Config::parse(text, &Overrides::default()).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn bad_values_name_the_field() {
        for (text, field) in [
            ("[journal]\nfile_cache = \"lots\"\n", "journal.file_cache"),
            ("[journal]\ncache_tiers = \"disk\"\n", "journal.cache_tiers"),
            (
                "[volumes]\ndefault_mode = \"fast\"\n",
                "volumes.default_mode",
            ),
            ("nbd = \"localhost\"\n", "nbd"),
            ("[retention]\nmax_age = \"soon\"\n", "retention.max_age"),
        ] {
            let err = Config::parse(text, &Overrides::default()).unwrap_err();
            assert!(err.contains(field), "{text}: {err}");
        }
    }
}
