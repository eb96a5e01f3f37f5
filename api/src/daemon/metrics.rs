//! Prometheus metrics: counters kept by the daemon (NBD requests and their
//! latency) plus what the journals and write paths report, rendered in
//! the text exposition format on `GET /metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tidemark_journal::CacheStats;
use tidemark_replicator::ReplicaStatus;

use super::registry::Registry;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    5.0,
];

/// A latency histogram with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, latency: Duration) {
        let secs = latency.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|&b| secs <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add(latency.as_nanos() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (bound, bucket) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// NBD request kinds with their own histogram.
pub const NBD_OPS: [&str; 5] = ["read", "write", "flush", "trim", "write_zeroes"];

/// The daemon's own counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Latency per NBD request kind, in `NBD_OPS` order.
    pub nbd_latency: [Histogram; 5],
    /// NBD requests answered with an error.
    pub nbd_errors: AtomicU64,
    /// NBD connections accepted.
    pub nbd_connections: AtomicU64,
    /// NBD connections open now.
    pub nbd_open: AtomicU64,
    /// Handshakes refused (malformed, unknown export, too slow).
    pub nbd_handshake_failures: AtomicU64,
    /// Connections closed at once because `limits.nbd_connections` were
    /// open.
    pub nbd_refused_connections: AtomicU64,
    /// Bytes of request and reply buffers held now (bounded by
    /// `limits.nbd_buffer_memory`).
    pub nbd_buffer_bytes: AtomicU64,
}

/// One volume's numbers, read once per scrape.
struct VolumeRow {
    name: String,
    group: String,
    stats: Option<tidemark_journal::VolumeStats>,
    history: tidemark_journal::History,
    size: u64,
    writers: u32,
    tags: Option<usize>,
    mode: (tidemark_journal::IoMode, tidemark_journal::IoMode),
}

/// One group's numbers, read once per scrape.
struct GroupRow {
    name: String,
    role: &'static str,
    journal_bytes: u64,
    epoch: u64,
    cache: CacheStats,
}

fn help(out: &mut String, name: &str, kind: &str, text: &str) {
    let _ = writeln!(out, "# HELP {name} {text}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

impl Metrics {
    /// Renders everything. Each volume's and group's numbers are read
    /// once, then written out metric by metric.
    pub fn render(&self, registry: &Registry) -> String {
        let mut out = String::with_capacity(16 << 10);
        let volumes: Vec<VolumeRow> = registry
            .volumes()
            .iter()
            .map(|v| VolumeRow {
                name: v.name.clone(),
                group: v.group.name.clone(),
                stats: v.group.write_path.stats(&v.name).ok(),
                history: v.history(),
                size: v.size,
                writers: v.writers.load(Ordering::Relaxed),
                tags: registry.tags(v).ok().map(|t| t.len()),
                mode: registry.mode(v),
            })
            .collect();
        type VolumeValue = fn(&VolumeRow) -> Option<u64>;
        let per_volume: [(&str, &str, &str, VolumeValue); 13] = [
            (
                "tidemark_writes_total",
                "counter",
                "Writes (including zeroes and trims) acknowledged.",
                |r| r.stats.map(|s| s.writes),
            ),
            (
                "tidemark_written_bytes_total",
                "counter",
                "Bytes covered by acknowledged writes.",
                |r| r.stats.map(|s| s.bytes),
            ),
            (
                "tidemark_sync_writes_total",
                "counter",
                "Writes acknowledged in sync mode.",
                |r| r.stats.map(|s| s.sync_writes),
            ),
            (
                "tidemark_async_writes_total",
                "counter",
                "Writes acknowledged in async mode.",
                |r| r.stats.map(|s| s.async_writes),
            ),
            (
                "tidemark_cache_fallbacks_total",
                "counter",
                "Async writes the cache had no room for (covered by a resync).",
                |r| r.stats.map(|s| s.cache_fallbacks),
            ),
            (
                "tidemark_mode_switches_total",
                "counter",
                "Adaptive switches between sync and async.",
                |r| r.stats.map(|s| s.mode_switches),
            ),
            (
                "tidemark_resynced_regions_total",
                "counter",
                "Regions re-read from the production volume and journalled.",
                |r| r.stats.map(|s| s.resynced_regions),
            ),
            (
                "tidemark_dirty_regions",
                "gauge",
                "Regions marked in the dirty-region map now.",
                |r| r.stats.map(|s| s.dirty_regions),
            ),
            ("tidemark_size_bytes", "gauge", "Volume size.", |r| {
                Some(r.size)
            }),
            (
                "tidemark_newest_seq",
                "gauge",
                "Newest durable seq of the volume's group.",
                |r| Some(r.history.newest_seq),
            ),
            (
                "tidemark_horizon_seq",
                "gauge",
                "Oldest retained point of the volume's group.",
                |r| Some(r.history.horizon_seq),
            ),
            (
                "tidemark_nbd_writers",
                "gauge",
                "Clients connected to the live export.",
                |r| Some(u64::from(r.writers)),
            ),
            ("tidemark_tags", "gauge", "Tags on the volume.", |r| {
                r.tags.map(|t| t as u64)
            }),
        ];
        for (name, kind, text, value) in per_volume {
            help(&mut out, name, kind, text);
            for r in &volumes {
                if let Some(x) = value(r) {
                    let _ = writeln!(
                        out,
                        "{name}{{volume=\"{}\",group=\"{}\"}} {x}",
                        r.name, r.group
                    );
                }
            }
        }
        help(
            &mut out,
            "tidemark_io_mode",
            "gauge",
            "1 for the mode writes go in now (configured mode as a label).",
        );
        for r in &volumes {
            let (configured, now) = r.mode;
            for mode in ["sync", "async"] {
                let on = u8::from(now.to_string() == mode);
                let _ = writeln!(out, "tidemark_io_mode{{volume=\"{}\",configured=\"{configured}\",mode=\"{mode}\"}} {on}", r.name);
            }
        }

        let groups: Vec<GroupRow> = registry
            .groups()
            .iter()
            .map(|g| GroupRow {
                name: g.name.clone(),
                role: g.role(),
                journal_bytes: g.journal().journal_bytes(),
                epoch: g.journal().epoch(),
                cache: g.journal().cache_stats(),
            })
            .collect();
        type TierValue = fn(&CacheStats) -> (u64, u64);
        let per_tier: [(&str, &str, &str, TierValue); 2] = [
            (
                "tidemark_cache_bytes",
                "gauge",
                "Bytes waiting in the monitoring cache, per tier.",
                |c| (c.memory.used_bytes, c.file.map_or(0, |f| f.used_bytes)),
            ),
            (
                "tidemark_cache_limit_bytes",
                "gauge",
                "Bound of each cache tier.",
                |c| (c.memory.limit_bytes, c.file.map_or(0, |f| f.capacity_bytes)),
            ),
        ];
        type GroupValue = fn(&GroupRow) -> u64;
        let per_group: [(&str, &str, &str, GroupValue); 6] = [
            (
                "tidemark_journal_bytes",
                "gauge",
                "Bytes of journal held in segments.",
                |g| g.journal_bytes,
            ),
            (
                "tidemark_cache_tier_switches_total",
                "counter",
                "Switches between the memory and file tiers.",
                |g| g.cache.tier_switches,
            ),
            (
                "tidemark_cache_spilled_records_total",
                "counter",
                "Records that went to the file tier.",
                |g| g.cache.spilled_records,
            ),
            (
                "tidemark_cache_waits_total",
                "counter",
                "Appends that waited for room in the memory cache.",
                |g| g.cache.memory.waits,
            ),
            (
                "tidemark_epoch",
                "gauge",
                "Fencing epoch of the group.",
                |g| g.epoch,
            ),
            (
                "tidemark_cache_file_disk_bytes",
                "gauge",
                "Disk bytes the group's file-cache ring holds now (drawn from the shared budget).",
                |g| g.cache.file.map_or(0, |f| f.disk_bytes),
            ),
        ];
        for (name, kind, text, value) in per_tier {
            help(&mut out, name, kind, text);
            for g in &groups {
                let (memory, file) = value(&g.cache);
                let _ = writeln!(
                    out,
                    "{name}{{group=\"{}\",tier=\"memory\"}} {memory}",
                    g.name
                );
                let _ = writeln!(out, "{name}{{group=\"{}\",tier=\"file\"}} {file}", g.name);
            }
        }
        // The bounds every group shares.
        let budget = registry.cache_budget();
        for (name, text, memory, file) in [
            (
                "tidemark_cache_budget_used_bytes",
                "Bytes of the daemon-wide cache budget in use, per tier (file: disk blocks).",
                budget.memory.used(),
                budget.file.used(),
            ),
            (
                "tidemark_cache_budget_limit_bytes",
                "The daemon-wide cache budget, per tier, shared by every group.",
                budget.memory.limit(),
                budget.file.limit(),
            ),
        ] {
            help(&mut out, name, "gauge", text);
            let _ = writeln!(out, "{name}{{tier=\"memory\"}} {memory}");
            let _ = writeln!(out, "{name}{{tier=\"file\"}} {file}");
        }
        for (name, kind, text, value) in per_group {
            help(&mut out, name, kind, text);
            for g in &groups {
                let _ = writeln!(out, "{name}{{group=\"{}\"}} {}", g.name, value(g));
            }
        }
        help(
            &mut out,
            "tidemark_role",
            "gauge",
            "1 for this site's role in the group (primary or replica).",
        );
        for g in &groups {
            for role in ["primary", "replica"] {
                let on = u8::from(g.role == role);
                let _ = writeln!(
                    out,
                    "tidemark_role{{group=\"{}\",role=\"{role}\"}} {on}",
                    g.name
                );
            }
        }
        self.render_replicas(&mut out, registry, &volumes);
        render_failover(
            &mut out,
            registry,
            &groups.iter().map(|g| g.name.clone()).collect::<Vec<_>>(),
        );
        render_archive(&mut out, registry);

        help(
            &mut out,
            "tidemark_nbd_request_seconds",
            "histogram",
            "NBD request latency, by command.",
        );
        for (op, h) in NBD_OPS.iter().zip(&self.nbd_latency) {
            h.render(
                &mut out,
                "tidemark_nbd_request_seconds",
                &format!("op=\"{op}\""),
            );
        }
        for (name, kind, text, value) in [
            (
                "tidemark_nbd_errors_total",
                "counter",
                "NBD requests answered with an error.",
                &self.nbd_errors,
            ),
            (
                "tidemark_nbd_connections_total",
                "counter",
                "NBD connections accepted.",
                &self.nbd_connections,
            ),
            (
                "tidemark_nbd_connections",
                "gauge",
                "NBD connections open now.",
                &self.nbd_open,
            ),
            (
                "tidemark_nbd_handshake_failures_total",
                "counter",
                "NBD handshakes refused.",
                &self.nbd_handshake_failures,
            ),
            (
                "tidemark_nbd_refused_connections_total",
                "counter",
                "NBD connections closed at once: the connection limit was reached.",
                &self.nbd_refused_connections,
            ),
            (
                "tidemark_nbd_buffer_bytes",
                "gauge",
                "Bytes of NBD request and reply buffers held now.",
                &self.nbd_buffer_bytes,
            ),
        ] {
            help(&mut out, name, kind, text);
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
        out
    }
}

impl Metrics {
    /// The replication series: one line per replicated volume and replica
    /// site (a group's numbers repeated for each of its volumes, as users
    /// look a volume up, not a group).
    fn render_replicas(&self, out: &mut String, registry: &Registry, volumes: &[VolumeRow]) {
        let statuses = registry.replication.statuses();
        if statuses.is_empty() {
            return;
        }
        type ReplicaValue = fn(&ReplicaStatus) -> String;
        let series: [(&str, &str, &str, ReplicaValue); 7] = [
            (
                "tidemark_replica_lag_seconds",
                "gauge",
                "Time between the newest record here and the newest durable on the replica.",
                |s| format!("{:.3}", s.lag_seconds),
            ),
            (
                "tidemark_replica_rpo_seconds",
                "gauge",
                "Age of the oldest record not yet durable on the replica (0 when caught up).",
                |s| format!("{:.3}", s.rpo_seconds),
            ),
            (
                "tidemark_replica_lag_bytes",
                "gauge",
                "Journal bytes not yet durable on the replica.",
                |s| s.lag_bytes.to_string(),
            ),
            (
                "tidemark_replica_sent_bytes_total",
                "counter",
                "Bytes of records sent to the replica.",
                |s| s.sent_bytes.to_string(),
            ),
            (
                "tidemark_replica_resync_bytes_total",
                "counter",
                "Bytes of regions sent to the replica by initial syncs and resyncs.",
                |s| s.resync_bytes.to_string(),
            ),
            (
                "tidemark_replica_acked_seq",
                "gauge",
                "Newest seq durable on the replica.",
                |s| s.acked_seq.to_string(),
            ),
            (
                "tidemark_replica_rpo_alert",
                "gauge",
                "1 while the RPO is over [replication] rpo_alert.",
                |s| u8::from(s.rpo_alert).to_string(),
            ),
        ];
        for (name, kind, text, value) in series {
            help(out, name, kind, text);
            for status in &statuses {
                for v in volumes.iter().filter(|v| v.group == status.group) {
                    let _ = writeln!(
                        out,
                        "{name}{{volume=\"{}\",group=\"{}\",replica=\"{}\"}} {}",
                        v.name,
                        v.group,
                        status.address,
                        value(status)
                    );
                }
            }
        }
        help(
            out,
            "tidemark_replica_mode",
            "gauge",
            "1 for the mode the link to the replica is in now (adaptive links switch between sync and async); configured is the mode it was added with.",
        );
        for status in &statuses {
            for v in volumes.iter().filter(|v| v.group == status.group) {
                for mode in ["sync", "async"] {
                    let on = u8::from(status.effective_mode.to_string() == mode);
                    let _ = writeln!(
                        out,
                        "tidemark_replica_mode{{volume=\"{}\",replica=\"{}\",configured=\"{}\",mode=\"{mode}\"}} {on}",
                        v.name, status.address, status.mode
                    );
                }
            }
        }
        help(
            out,
            "tidemark_replica_state",
            "gauge",
            "1 for the state of the link to the replica.",
        );
        for status in &statuses {
            for v in volumes.iter().filter(|v| v.group == status.group) {
                for state in [
                    "connecting",
                    "initial-sync",
                    "streaming",
                    "resyncing",
                    "disconnected",
                ] {
                    let on = u8::from(status.state.to_string() == state);
                    let _ = writeln!(
                        out,
                        "tidemark_replica_state{{volume=\"{}\",replica=\"{}\",state=\"{state}\"}} {on}",
                        v.name, status.address
                    );
                }
            }
        }
    }
}

/// The archive series, one line per group.
fn render_archive(out: &mut String, registry: &Registry) {
    use std::fmt::Write as _;
    use tidemark_replicator::archive::ArchiveStatus;
    let Some(archive) = registry.archive.get() else {
        return;
    };
    let statuses = archive.statuses();
    type ArchiveValue = fn(&ArchiveStatus) -> String;
    let series: [(&str, &str, &str, ArchiveValue); 11] = [
        (
            "tidemark_archive_archived_seq",
            "gauge",
            "Every record of the group up to this seq is in the archive.",
            |s| s.archived_seq.to_string(),
        ),
        (
            "tidemark_archive_archived_timestamp_seconds",
            "gauge",
            "Time (Unix seconds) of the newest archived record (0 before the first).",
            |s| {
                let nanos = s.archived_time.map_or(0, |t| t.as_nanos());
                format!("{:.3}", nanos as f64 / 1e9)
            },
        ),
        (
            "tidemark_archive_lag_seconds",
            "gauge",
            "Time between the newest record here and the newest archived.",
            |s| format!("{:.3}", s.lag_seconds),
        ),
        (
            "tidemark_archive_bytes",
            "gauge",
            "Bytes of the group's objects in the archive (chunks counted once).",
            |s| s.bytes.to_string(),
        ),
        (
            "tidemark_archive_objects",
            "gauge",
            "The group's objects in the archive.",
            |s| s.objects.to_string(),
        ),
        (
            "tidemark_archive_uploads_total",
            "counter",
            "Objects uploaded by this process.",
            |s| s.uploads.to_string(),
        ),
        (
            "tidemark_archive_errors_total",
            "counter",
            "Archive rounds that failed (each is retried with backoff).",
            |s| s.errors.to_string(),
        ),
        (
            "tidemark_archive_failing",
            "gauge",
            "1 while the last archive round failed (archive status says why), 0 once one succeeds.",
            |s| u8::from(s.last_error.is_some()).to_string(),
        ),
        (
            "tidemark_archive_base_read_bytes_total",
            "counter",
            "Bytes of volume data read to make base versions (after the first, only the chunks records touched).",
            |s| s.base_read_bytes.to_string(),
        ),
        (
            "tidemark_archive_gaps",
            "gauge",
            "Windows of history the archive lacks.",
            |s| s.gaps.to_string(),
        ),
        (
            "tidemark_archive_active",
            "gauge",
            "1 while this site archives the group (it is the primary).",
            |s| u8::from(s.active).to_string(),
        ),
    ];
    for (name, kind, text, value) in series {
        help(out, name, kind, text);
        for s in &statuses {
            let _ = writeln!(out, "{name}{{group=\"{}\"}} {}", s.group, value(s));
        }
    }
}

/// The watch over primaries and the role changes.
fn render_failover(out: &mut String, registry: &Registry, groups: &[String]) {
    use std::fmt::Write as _;
    let f = &registry.failover;
    help(
        out,
        "tidemark_failover_phi",
        "gauge",
        "Suspicion that the group's primary is down (phi accrual; replica groups).",
    );
    for g in groups {
        if registry.group_by_name(g).is_ok_and(|g| g.is_replica()) {
            let _ = writeln!(
                out,
                "tidemark_failover_phi{{group=\"{g}\"}} {}",
                f.monitor.phi(g)
            );
        }
    }
    let status = f.monitor.status(None);
    if let Some(age) = status.last_heartbeat_seconds {
        help(
            out,
            "tidemark_failover_last_heartbeat_seconds",
            "gauge",
            "Seconds since a primary last said something to this site.",
        );
        let _ = writeln!(out, "tidemark_failover_last_heartbeat_seconds {age}");
    }
    for (name, text, value) in [
        (
            "tidemark_takeovers_total",
            "Takeovers carried out by this site.",
            &f.takeovers,
        ),
        (
            "tidemark_demotions_total",
            "Demotions of this site by a newer primary.",
            &f.demotions,
        ),
    ] {
        help(out, name, "counter", text);
        let _ = writeln!(
            out,
            "{name} {}",
            value.load(std::sync::atomic::Ordering::SeqCst)
        );
    }
    if let Some(witness) = f.witness.get() {
        help(
            out,
            "tidemark_failover_witness_held",
            "gauge",
            "1 while this site holds the group's key in the witness (and may write it), 0 once the lease ran out.",
        );
        for (group, held) in witness.holdings() {
            let _ = writeln!(
                out,
                "tidemark_failover_witness_held{{group=\"{group}\"}} {}",
                u8::from(held)
            );
        }
    }
    help(
        out,
        "tidemark_failover_probe_failures",
        "gauge",
        "Failures in a row of each failover probe and trigger.",
    );
    for p in &status.probes {
        let target = p.target.replace('\\', "\\\\").replace('"', "\\\"");
        let _ = writeln!(
            out,
            "tidemark_failover_probe_failures{{kind=\"{}\",target=\"{target}\"}} {}",
            p.kind, p.failures_in_a_row
        );
    }
}
