//! The daemon's configuration: a TOML file (`--config`), every field
//! optional, unknown fields refused by name; command-line flags override
//! the file. Documented field by field in `docs/configuration.md`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tidemark_journal::{CacheTiers, IoMode};

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
    volumes: VolumesFile,
    #[serde(default)]
    journal: JournalFile,
    #[serde(default)]
    retention: RetentionFile,
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
        let duration = |field: &str, value: &Option<String>| -> Result<Option<Duration>, String> {
            value
                .as_deref()
                .map(|text| parse_duration(text).map_err(|e| format!("{field}: {e}")))
                .transpose()
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
        Ok(Config {
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
