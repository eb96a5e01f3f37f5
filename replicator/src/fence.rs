//! Fencing on the link: a site that holds a group as primary at a higher
//! epoch than a stream's refuses it and says so in the refusal's
//! metadata (`tidemark-fence`), with its epoch history; the sender learns
//! there that it is no longer the primary and demotes itself.

use tidemark_journal::epochs::History;
use tidemark_journal::manifest::EpochStart;
use tidemark_journal::Seq;
use tonic::Status;

/// The metadata key of a fencing refusal.
const KEY: &str = "tidemark-fence";

/// A newer primary of a group, as a refusal (or a replica's position)
/// reveals it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    /// The group.
    pub group: String,
    /// The other site's epoch.
    pub epoch: u64,
    /// Its history of the group.
    pub history: History,
    /// The site that said so.
    pub by: String,
}

/// What the daemon does when it learns it was fenced.
pub type FenceSink = std::sync::Arc<dyn Fn(Fence) + Send + Sync>;

/// A refusal carrying this site's epoch and history of a group.
pub fn refusal(reason: String, epoch: u64, history: &History) -> Status {
    let mut status = Status::failed_precondition(reason);
    let epochs: Vec<String> = history
        .epochs
        .iter()
        .map(|e| format!("{}@{}", e.epoch, e.first_seq))
        .collect();
    let value = format!("{epoch};{};{}", history.newest, epochs.join(","));
    if let Ok(v) = value.parse() {
        status.metadata_mut().insert(KEY, v);
    }
    status
}

/// The fence in a refusal, if it is one.
pub fn from_status(status: &Status, group: &str, by: &str) -> Option<Fence> {
    let value = status.metadata().get(KEY)?.to_str().ok()?;
    let mut parts = value.split(';');
    let epoch: u64 = parts.next()?.parse().ok()?;
    let newest: Seq = parts.next()?.parse().ok()?;
    let epochs = parts
        .next()
        .unwrap_or("")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|e| {
            let (epoch, first) = e.split_once('@')?;
            Some(EpochStart {
                epoch: epoch.parse().ok()?,
                first_seq: first.parse().ok()?,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Fence {
        group: group.to_string(),
        epoch,
        history: History { epochs, newest },
        by: by.to_string(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_fence_travels_in_a_refusal() {
        let history = History {
            epochs: vec![
                EpochStart {
                    epoch: 1,
                    first_seq: 7,
                },
                EpochStart {
                    epoch: 3,
                    first_seq: 20,
                },
            ],
            newest: 42,
        };
        let status = refusal("fenced".into(), 3, &history);
        let fence = from_status(&status, "db", "b:1").unwrap();
        assert_eq!(fence.epoch, 3);
        assert_eq!(fence.history, history);
        assert_eq!(fence.by, "b:1");
        assert!(from_status(&Status::internal("x"), "db", "b").is_none());
    }
}
