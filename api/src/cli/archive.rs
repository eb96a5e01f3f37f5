//! `tidemark restore … --from-archive`: a point restored from the bucket
//! alone, on a machine with no daemon and no data (after a disaster); and
//! the printing of `tidemark archive status`.

use std::io::IsTerminal;
use std::sync::Arc;

use serde_json::json;
use tidemark_proto::v1 as pb;
use tidemark_replicator::archive::catalog::Catalog;
use tidemark_replicator::archive::{store, Location, StoreOptions};

use super::client::{print_json, progress_bar, usage, Failure};
use crate::point_spec::PointSpec;
use crate::size::format_size;

/// What `restore --from-archive` was asked.
#[derive(Debug)]
pub struct FromArchive {
    pub volume: String,
    pub at: String,
    pub to: std::path::PathBuf,
    pub url: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub parallel: usize,
}

fn failed(e: impl std::fmt::Display) -> Failure {
    Failure {
        code: 1,
        message: e.to_string(),
    }
}

/// Restores a point from the archive, with a progress bar on a terminal.
pub fn restore(r: FromArchive) -> Result<(), Failure> {
    let location = Location::parse(&r.url).map_err(|e| usage(e.to_string()))?;
    let point = PointSpec::parse(&r.at)
        .and_then(|p| p.to_archive())
        .map_err(usage)?;
    let target =
        std::path::absolute(&r.to).map_err(|e| usage(format!("--to {}: {e}", r.to.display())))?;
    if r.parallel == 0 {
        return Err(usage("--parallel must be at least 1".into()));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| failed(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(async move {
        let options = StoreOptions {
            endpoint: r.endpoint.clone(),
            region: r.region.clone(),
            timeout: None,
        };
        let store = store::open(&location, &options).await.map_err(failed)?;
        let catalog = Arc::new(
            Catalog::for_volume(store, &r.volume)
                .await
                .map_err(failed)?,
        );
        let seq = catalog.resolve(&r.volume, &point).await.map_err(failed)?;
        let terminal = std::io::stderr().is_terminal();
        let bar = terminal.then(|| progress_bar(0));
        let shown = bar.clone();
        let last_line = Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
        let progress = Arc::new(move |done: u64, total: u64| match &shown {
            Some(bar) => {
                bar.set_length(total);
                bar.set_position(done);
            }
            None => {
                // A line per tenth, for logs.
                let tenth = done * 10 / total.max(1);
                if last_line.swap(tenth, std::sync::atomic::Ordering::Relaxed) != tenth {
                    eprintln!(
                        "restoring: {} of {} ({}%)",
                        format_size(done),
                        format_size(total),
                        done * 100 / total.max(1)
                    );
                }
            }
        });
        let restored = tidemark_replicator::archive::restore::restore(
            catalog.clone(),
            &r.volume,
            seq,
            &target,
            r.parallel,
            progress,
        )
        .await
        .map_err(failed)?;
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        println!(
            "restored volume {} at seq {} from {} to {} ({}, {} downloaded)",
            r.volume,
            restored.seq,
            catalog.store().location(),
            target.display(),
            format_size(restored.size),
            format_size(restored.downloaded)
        );
        Ok(())
    })
}

/// Prints `archive status`.
pub fn print_status(s: &pb::ArchiveStatusResponse, json: bool) {
    if json {
        let groups: Vec<_> = s
            .groups
            .iter()
            .map(|g| {
                json!({
                    "group": g.group,
                    "active": g.active,
                    "archived_seq": g.archived_seq,
                    "archived_time": (!g.archived_time.is_empty()).then_some(&g.archived_time),
                    "lag_seconds": g.lag_seconds,
                    "bytes": g.bytes,
                    "objects": g.objects,
                    "gaps": g.gaps,
                    "base_seq": g.base_seq,
                    "last_error": (!g.last_error.is_empty()).then_some(&g.last_error),
                })
            })
            .collect();
        print_json(&json!({ "url": s.url, "groups": groups }));
        return;
    }
    println!("archive {}", s.url);
    println!(
        "{:<16} {:>12} {:<30} {:>9} {:>10} {:>8}  LAST ERROR",
        "GROUP", "ARCHIVED", "ARCHIVED TIME", "LAG", "BYTES", "OBJECTS"
    );
    for g in &s.groups {
        let group = if g.active {
            g.group.clone()
        } else {
            format!("{} (replica)", g.group)
        };
        println!(
            "{:<16} {:>12} {:<30} {:>8.1}s {:>10} {:>8}  {}",
            group,
            g.archived_seq,
            if g.archived_time.is_empty() {
                "-"
            } else {
                &g.archived_time
            },
            g.lag_seconds,
            format_size(g.bytes),
            g.objects,
            if g.last_error.is_empty() {
                "-"
            } else {
                &g.last_error
            }
        );
    }
}
