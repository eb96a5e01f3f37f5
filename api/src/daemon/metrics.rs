//! Prometheus metrics: counters kept by the daemon (NBD requests and their
//! latency) plus what the journals and write paths report, rendered in
//! the text exposition format on `GET /metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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
    /// Handshakes refused (malformed, unknown export).
    pub nbd_handshake_failures: AtomicU64,
}

fn help(out: &mut String, name: &str, kind: &str, text: &str) {
    let _ = writeln!(out, "# HELP {name} {text}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

impl Metrics {
    /// Renders everything.
    pub fn render(&self, registry: &Registry) -> String {
        let mut out = String::with_capacity(16 << 10);
        let volumes = registry.volumes();
        let per_volume =
            |out: &mut String,
             name: &str,
             kind: &str,
             text: &str,
             value: &dyn Fn(&super::registry::Volume) -> Option<f64>| {
                help(out, name, kind, text);
                for v in &volumes {
                    if let Some(x) = value(v) {
                        let _ = writeln!(
                            out,
                            "{name}{{volume=\"{}\",group=\"{}\"}} {x}",
                            v.name, v.group.name
                        );
                    }
                }
            };
        let stats = |v: &super::registry::Volume| v.group.write_path.stats(&v.name).ok();
        per_volume(
            &mut out,
            "tidemark_writes_total",
            "counter",
            "Writes (including zeroes and trims) acknowledged.",
            &|v| stats(v).map(|s| s.writes as f64),
        );
        per_volume(
            &mut out,
            "tidemark_written_bytes_total",
            "counter",
            "Bytes covered by acknowledged writes.",
            &|v| stats(v).map(|s| s.bytes as f64),
        );
        per_volume(
            &mut out,
            "tidemark_sync_writes_total",
            "counter",
            "Writes acknowledged in sync mode.",
            &|v| stats(v).map(|s| s.sync_writes as f64),
        );
        per_volume(
            &mut out,
            "tidemark_async_writes_total",
            "counter",
            "Writes acknowledged in async mode.",
            &|v| stats(v).map(|s| s.async_writes as f64),
        );
        per_volume(
            &mut out,
            "tidemark_cache_fallbacks_total",
            "counter",
            "Async writes the cache had no room for (covered by a resync).",
            &|v| stats(v).map(|s| s.cache_fallbacks as f64),
        );
        per_volume(
            &mut out,
            "tidemark_mode_switches_total",
            "counter",
            "Adaptive switches between sync and async.",
            &|v| stats(v).map(|s| s.mode_switches as f64),
        );
        per_volume(
            &mut out,
            "tidemark_resynced_regions_total",
            "counter",
            "Regions re-read from the production volume and journalled.",
            &|v| stats(v).map(|s| s.resynced_regions as f64),
        );
        per_volume(
            &mut out,
            "tidemark_dirty_regions",
            "gauge",
            "Regions marked in the dirty-region map now.",
            &|v| stats(v).map(|s| s.dirty_regions as f64),
        );
        per_volume(
            &mut out,
            "tidemark_size_bytes",
            "gauge",
            "Volume size.",
            &|v| Some(v.size as f64),
        );
        per_volume(
            &mut out,
            "tidemark_newest_seq",
            "gauge",
            "Newest durable seq of the volume's group.",
            &|v| Some(v.history().newest_seq as f64),
        );
        per_volume(
            &mut out,
            "tidemark_horizon_seq",
            "gauge",
            "Oldest retained point of the volume's group.",
            &|v| Some(v.history().horizon_seq as f64),
        );
        per_volume(
            &mut out,
            "tidemark_nbd_writers",
            "gauge",
            "Clients connected to the live export.",
            &|v| Some(v.writers.load(Ordering::Relaxed) as f64),
        );
        per_volume(
            &mut out,
            "tidemark_tags",
            "gauge",
            "Tags on the volume.",
            &|v| registry.tags(v).ok().map(|t| t.len() as f64),
        );
        help(
            &mut out,
            "tidemark_io_mode",
            "gauge",
            "1 for the mode writes go in now (configured mode as a label).",
        );
        for v in &volumes {
            let (configured, now) = registry.mode(v);
            for mode in ["sync", "async"] {
                let on = u8::from(now.to_string() == mode);
                let _ = writeln!(out, "tidemark_io_mode{{volume=\"{}\",configured=\"{configured}\",mode=\"{mode}\"}} {on}", v.name);
            }
        }

        let groups = registry.groups();
        help(
            &mut out,
            "tidemark_journal_bytes",
            "gauge",
            "Bytes of journal held in segments.",
        );
        for g in &groups {
            let _ = writeln!(
                out,
                "tidemark_journal_bytes{{group=\"{}\"}} {}",
                g.name,
                g.journal().journal_bytes()
            );
        }
        help(
            &mut out,
            "tidemark_cache_bytes",
            "gauge",
            "Bytes waiting in the monitoring cache, per tier.",
        );
        let caches: Vec<_> = groups
            .iter()
            .map(|g| (g.name.clone(), g.journal().cache_stats()))
            .collect();
        for (name, c) in &caches {
            let _ = writeln!(
                out,
                "tidemark_cache_bytes{{group=\"{name}\",tier=\"memory\"}} {}",
                c.memory.used_bytes
            );
            let _ = writeln!(
                out,
                "tidemark_cache_bytes{{group=\"{name}\",tier=\"file\"}} {}",
                c.file.map_or(0, |f| f.used_bytes)
            );
        }
        help(
            &mut out,
            "tidemark_cache_limit_bytes",
            "gauge",
            "Bound of each cache tier.",
        );
        for (name, c) in &caches {
            let _ = writeln!(
                out,
                "tidemark_cache_limit_bytes{{group=\"{name}\",tier=\"memory\"}} {}",
                c.memory.limit_bytes
            );
            let _ = writeln!(
                out,
                "tidemark_cache_limit_bytes{{group=\"{name}\",tier=\"file\"}} {}",
                c.file.map_or(0, |f| f.capacity_bytes)
            );
        }
        help(
            &mut out,
            "tidemark_cache_tier_switches_total",
            "counter",
            "Switches between the memory and file tiers.",
        );
        for (name, c) in &caches {
            let _ = writeln!(
                out,
                "tidemark_cache_tier_switches_total{{group=\"{name}\"}} {}",
                c.tier_switches
            );
        }
        help(
            &mut out,
            "tidemark_cache_spilled_records_total",
            "counter",
            "Records that went to the file tier.",
        );
        for (name, c) in &caches {
            let _ = writeln!(
                out,
                "tidemark_cache_spilled_records_total{{group=\"{name}\"}} {}",
                c.spilled_records
            );
        }
        help(
            &mut out,
            "tidemark_cache_waits_total",
            "counter",
            "Appends that waited for room in the memory cache.",
        );
        for (name, c) in &caches {
            let _ = writeln!(
                out,
                "tidemark_cache_waits_total{{group=\"{name}\"}} {}",
                c.memory.waits
            );
        }
        help(
            &mut out,
            "tidemark_epoch",
            "gauge",
            "Fencing epoch of the group.",
        );
        for g in &groups {
            let _ = writeln!(
                out,
                "tidemark_epoch{{group=\"{}\"}} {}",
                g.name,
                g.journal().epoch()
            );
        }
        help(
            &mut out,
            "tidemark_role",
            "gauge",
            "1 for this site's role.",
        );
        let _ = writeln!(out, "tidemark_role{{role=\"primary\"}} 1");

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
        ] {
            help(&mut out, name, kind, text);
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
        out
    }
}
