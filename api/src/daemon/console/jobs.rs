//! Restores and rollbacks started from the console. A restore of a large
//! volume takes minutes, longer than a browser should hold a request open,
//! so the console starts one and then watches its progress here (the work
//! is the gRPC `Restore`, whose progress stream a task drains into the
//! job). A rollback's request stays open until it is done, and its job
//! shows how far it got meanwhile.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::Serialize;
use tidemark_proto::v1 as pb;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

/// Finished jobs kept for the console to show.
const KEEP: usize = 32;

/// One restore or rollback and how far it got.
#[derive(Clone, Debug, Serialize)]
pub struct Job {
    /// Its number, from 1.
    pub id: u64,
    /// `restore` or `rollback`.
    pub kind: &'static str,
    /// The volume restored or rolled back.
    pub volume: String,
    /// The point as asked for.
    pub at: String,
    /// The seq it resolved to (0 until known).
    pub seq: u64,
    /// Where it is written (a restore; empty for a rollback).
    pub to: String,
    /// Bytes written so far, and in all.
    pub done_bytes: u64,
    /// See `done_bytes`.
    pub total_bytes: u64,
    /// `running`, `done` or `failed`.
    pub state: &'static str,
    /// Why it failed.
    pub error: Option<String>,
    /// When it started (RFC 3339).
    pub started: String,
}

/// The jobs of this daemon's console.
#[derive(Debug, Default)]
pub struct Jobs {
    next: AtomicU64,
    jobs: Mutex<Vec<Job>>,
}

impl Jobs {
    /// Every job, newest first.
    pub fn list(&self) -> Vec<Job> {
        let mut jobs = self.jobs.lock().clone();
        jobs.reverse();
        jobs
    }

    /// Records a job of `kind` on `volume` at `at` (to `to`), running.
    pub fn start(&self, kind: &'static str, volume: &str, at: &str, to: &str) -> Job {
        let job = Job {
            id: self.next.fetch_add(1, Ordering::Relaxed) + 1,
            kind,
            volume: volume.to_string(),
            at: at.to_string(),
            seq: 0,
            to: to.to_string(),
            done_bytes: 0,
            total_bytes: 0,
            state: "running",
            error: None,
            started: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        };
        let mut jobs = self.jobs.lock();
        jobs.push(job.clone());
        // Drop the oldest finished jobs; running ones always stay.
        while jobs.len() > KEEP {
            match jobs.iter().position(|j| j.state != "running") {
                Some(i) => {
                    jobs.remove(i);
                }
                None => break,
            }
        }
        job
    }

    /// Records a restore of `volume` at `at` to `to` and follows its
    /// progress `stream` to the end; returns the job as it starts.
    pub fn follow_restore(
        self: &Arc<Self>,
        volume: &str,
        at: &str,
        to: &str,
        mut stream: impl Stream<Item = Result<pb::RestoreProgress, Status>> + Send + Unpin + 'static,
    ) -> Job {
        let job = self.start("restore", volume, at, to);
        let (jobs, id) = (self.clone(), job.id);
        tokio::spawn(async move {
            let mut ended = false;
            while let Some(item) = stream.next().await {
                jobs.update(id, |job| match &item {
                    Ok(p) => {
                        job.seq = p.seq;
                        job.done_bytes = p.done_bytes;
                        job.total_bytes = p.total_bytes;
                        if p.done {
                            job.state = "done";
                        }
                    }
                    Err(status) => {
                        job.state = "failed";
                        job.error = Some(status.message().to_string());
                    }
                });
                ended = matches!(&item, Ok(p) if p.done) || item.is_err();
            }
            if !ended {
                jobs.update(id, |job| {
                    job.state = "failed";
                    job.error = Some("the restore stopped before it finished".into());
                });
            }
        });
        job
    }

    /// Changes job `id`, if it is still kept.
    pub fn update(&self, id: u64, change: impl FnOnce(&mut Job)) {
        if let Some(job) = self.jobs.lock().iter_mut().find(|j| j.id == id) {
            change(job);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    // The stream's item type is tonic's.
    #[allow(clippy::result_large_err)]
    fn progress(done: u64, finished: bool) -> Result<pb::RestoreProgress, Status> {
        Ok(pb::RestoreProgress {
            done_bytes: done,
            total_bytes: 100,
            done: finished,
            seq: 7,
        })
    }

    async fn settle(jobs: &Jobs, id: u64) -> Job {
        for _ in 0..100 {
            let job = jobs.list().into_iter().find(|j| j.id == id).unwrap();
            if job.state != "running" {
                return job;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("job {id} never finished");
    }

    #[tokio::test]
    async fn a_job_follows_its_stream_to_done_failed_or_cut_off() {
        let jobs = Arc::new(Jobs::default());
        let ok = jobs.follow_restore(
            "db",
            "latest",
            "/x",
            tokio_stream::iter(vec![progress(50, false), progress(100, true)]),
        );
        let done = settle(&jobs, ok.id).await;
        assert_eq!((done.state, done.done_bytes, done.seq), ("done", 100, 7));

        let failing = jobs.follow_restore(
            "db",
            "latest",
            "/x",
            tokio_stream::iter(vec![
                progress(50, false),
                Err(Status::internal("disk full")),
            ]),
        );
        let failed = settle(&jobs, failing.id).await;
        assert_eq!(failed.state, "failed");
        assert_eq!(failed.error.as_deref(), Some("disk full"));

        let cut = jobs.follow_restore(
            "db",
            "latest",
            "/x",
            tokio_stream::iter(vec![progress(1, false)]),
        );
        assert_eq!(settle(&jobs, cut.id).await.state, "failed");
        assert_eq!(jobs.list()[0].id, cut.id, "newest first");
    }
}
