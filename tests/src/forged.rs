//! A primary of the test's own: a journal in a temporary directory whose
//! records a test sends to a replica site by hand, over the real
//! replication service, to say what a real primary never would (a damaged
//! record, a gap, an old epoch, a newest seq it never ships).

use std::time::Duration;

use tidemark_journal::{Change, Journal, JournalOptions, RawRecord, VolumeInfo};
use tidemark_proto::v1::replication_message::{Heartbeat, Hello, Message};
use tidemark_proto::v1::{ReplicatedVolume, ReplicationMessage};

use crate::Daemon;

/// A journal of one volume that plays a group's primary.
#[derive(Debug)]
pub struct ForgedPrimary {
    /// Its journal.
    pub journal: Journal,
    /// Its one volume.
    pub volume: VolumeInfo,
    // Last: dropped after the journal, whose index flushes into it.
    _dir: tempfile::TempDir,
}

impl ForgedPrimary {
    /// Group and volume `name` of `size` bytes, at `epoch`.
    pub fn new(name: &str, size: u64, epoch: u64) -> ForgedPrimary {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(
            &dir.path().join("journal"),
            JournalOptions {
                group: name.into(),
                ..Default::default()
            },
        )
        .unwrap();
        let volume = journal.create_volume(name, size).unwrap();
        if epoch > 0 {
            journal.set_epoch(epoch).unwrap();
        }
        ForgedPrimary {
            _dir: dir,
            journal,
            volume,
        }
    }

    /// Journals `count` 4 KiB writes, block i filled with i + 1; returns
    /// their records as the segments hold them.
    pub fn writes(&self, count: u8) -> Vec<RawRecord> {
        for i in 0..count {
            self.journal
                .append(
                    self.volume.id,
                    Change::Write {
                        offset: u64::from(i) * 4096,
                        data: &[i + 1; 4096],
                    },
                )
                .unwrap()
                .wait()
                .unwrap();
        }
        self.journal.read_raw(1, None, 1 << 20).unwrap().records
    }

    /// A hello at `epoch` that says the newest seq here is `newest`.
    pub fn hello(&self, epoch: u64, newest: u64) -> ReplicationMessage {
        message(Message::Hello(Hello {
            group: self.journal.group(),
            volumes: vec![ReplicatedVolume {
                id: self.volume.id,
                name: self.volume.name.clone(),
                size: self.volume.size,
            }],
            epoch,
            horizon_seq: 0,
            horizon_ns: self.journal.history().horizon_time.as_nanos(),
            newest_seq: newest,
            source_id: self.journal.group_id(),
            version: 1,
            epochs: Vec::new(),
            detach: false,
        }))
    }
}

/// `records` after `prev`, as one message.
pub fn records(prev: u64, records: &[RawRecord]) -> ReplicationMessage {
    message(Message::Records(
        tidemark_replicator::wire::pack(prev, records).unwrap(),
    ))
}

/// A heartbeat of `epoch` saying the newest seq is `newest`.
pub fn heartbeat(epoch: u64, newest: u64) -> ReplicationMessage {
    message(Message::Heartbeat(Heartbeat {
        newest_seq: newest,
        newest_ns: 0,
        sent_ns: 1,
        epoch,
    }))
}

fn message(m: Message) -> ReplicationMessage {
    ReplicationMessage { message: Some(m) }
}

/// Opens a replication stream to `site`, sends `messages`, and returns the
/// replies (debug-printed) and why the site ended it (`None`: it went on
/// until three seconds passed without a reply).
pub async fn stream(
    site: &Daemon,
    messages: Vec<ReplicationMessage>,
) -> (Vec<String>, Option<String>) {
    let mut client = site.grpc_client().await;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    for m in messages {
        tx.send(m).await.unwrap();
    }
    let call = client
        .replicate(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    let mut inbound = match call {
        Ok(r) => r.into_inner(),
        Err(status) => return (Vec::new(), Some(status.message().to_string())),
    };
    let mut replies = Vec::new();
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(3), inbound.message()).await {
            Ok(Ok(Some(reply))) => replies.push(format!("{reply:?}")),
            Ok(Ok(None)) => break None,
            Ok(Err(status)) => break Some(status.message().to_string()),
            Err(_) => break None,
        }
    };
    drop(tx);
    (replies, ended)
}
