//! The gRPC Ingest stream of capture agents: writes, zeroes, trims and
//! flushes journalled with NBD's semantics, errors answered per request.

#![allow(clippy::unwrap_used)]

use tidemark_proto::v1::ingest_request::{Flush, Op, Open, Range, Write};
use tidemark_proto::v1::{IngestReply, IngestRequest};
use tidemark_tests::{run, Daemon};
use tokio_stream::wrappers::ReceiverStream;

fn request(id: u64, op: Op) -> IngestRequest {
    IngestRequest { id, op: Some(op) }
}

async fn ingest(
    d: &Daemon,
    requests: Vec<IngestRequest>,
) -> Result<Vec<IngestReply>, tonic::Status> {
    let mut client = d.grpc_client().await;
    let (tx, rx) = tokio::sync::mpsc::channel(requests.len().max(1));
    for r in requests {
        tx.send(r).await.unwrap();
    }
    drop(tx);
    let mut stream = client.ingest(ReceiverStream::new(rx)).await?.into_inner();
    let mut replies = Vec::new();
    while let Some(reply) = stream.message().await? {
        replies.push(reply);
    }
    Ok(replies)
}

#[test]
fn ingest_writes_are_journalled_and_errors_do_not_end_the_stream() {
    let d = Daemon::start();
    d.create_volume("agent", "8M", "sync");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let replies = rt
        .block_on(ingest(
            &d,
            vec![
                request(
                    1,
                    Op::Open(Open {
                        volume: "agent".into(),
                    }),
                ),
                request(
                    2,
                    Op::Write(Write {
                        offset: 0,
                        data: vec![0xAB; 8192],
                        fua: false,
                    }),
                ),
                request(
                    3,
                    Op::Write(Write {
                        offset: (8 << 20) - 100,
                        data: vec![1; 4096],
                        fua: true,
                    }),
                ),
                request(
                    4,
                    Op::Zero(Range {
                        offset: 4096,
                        length: 4096,
                    }),
                ),
                request(
                    5,
                    Op::Open(Open {
                        volume: "other".into(),
                    }),
                ),
                request(6, Op::Flush(Flush {})),
                request(
                    7,
                    Op::Trim(Range {
                        offset: 1 << 20,
                        length: 1 << 20,
                    }),
                ),
            ],
        ))
        .unwrap();
    let ids: Vec<u64> = replies.iter().map(|r| r.id).collect();
    assert_eq!(ids, [1, 2, 3, 4, 5, 6, 7]);
    assert!(
        replies[1].error.is_empty() && replies[1].seq > 0 && replies[1].mode == "sync",
        "{:?}",
        replies[1]
    );
    assert!(
        replies[2].error.contains("outside the volume"),
        "{:?}",
        replies[2]
    );
    assert!(replies[3].error.is_empty() && replies[3].seq > replies[1].seq);
    assert!(
        replies[4].error.contains("already writes volume agent"),
        "{:?}",
        replies[4]
    );
    assert!(replies[5].error.is_empty() && replies[5].seq > replies[3].seq);
    assert!(replies[6].error.is_empty());

    let out = d.path("agent.img");
    run(
        "nbdcopy",
        &[
            &d.uri(&format!("agent@{}", replies[5].seq)),
            &out.display().to_string(),
        ],
    );
    let bytes = std::fs::read(&out).unwrap();
    assert!(bytes[..4096].iter().all(|&b| b == 0xAB));
    assert!(bytes[4096..].iter().all(|&b| b == 0));

    // A stream for an unknown volume is refused with a reason.
    let err = rt
        .block_on(ingest(
            &d,
            vec![request(
                1,
                Op::Open(Open {
                    volume: "nope".into(),
                }),
            )],
        ))
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(
        err.message().contains("unknown volume \"nope\""),
        "{}",
        err.message()
    );
    let err = rt
        .block_on(ingest(&d, vec![request(1, Op::Flush(Flush {}))]))
        .unwrap_err();
    assert!(
        err.message().contains("must open a volume"),
        "{}",
        err.message()
    );
    assert!(d.healthy());
}

/// A capture agent that keeps its stream open does not hold the daemon's
/// shutdown up: SIGTERM ends the stream between writes (UNAVAILABLE), the
/// daemon exits cleanly, and every write acknowledged on it is there
/// after a restart.
#[test]
fn an_open_ingest_stream_ends_at_shutdown_and_its_writes_are_kept() {
    let mut d = Daemon::start();
    d.create_volume("agent", "8M", "async");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (tx, mut stream) = rt.block_on(async {
        let mut client = d.grpc_client().await;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tx.send(request(
            1,
            Op::Open(Open {
                volume: "agent".into(),
            }),
        ))
        .await
        .unwrap();
        tx.send(request(
            2,
            Op::Write(Write {
                offset: 4096,
                data: vec![0x5A; 4096],
                fua: false,
            }),
        ))
        .await
        .unwrap();
        let mut stream = client
            .ingest(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        for _ in 0..2 {
            let reply = stream.message().await.unwrap().unwrap();
            assert!(reply.error.is_empty(), "{reply:?}");
        }
        (tx, stream)
    });
    // The stream stays open (tx is kept); the daemon is told to stop.
    let status = d.stop();
    assert!(
        status.success(),
        "the daemon did not stop cleanly: {status}"
    );
    let ended = rt.block_on(stream.message());
    assert!(
        matches!(&ended, Err(s) if s.code() == tonic::Code::Unavailable)
            || matches!(ended, Ok(None)),
        "{ended:?}"
    );
    drop(tx);
    d.restart();
    let out = d.path("agent.img");
    run("nbdcopy", &[&d.uri("agent"), &out.display().to_string()]);
    let image = std::fs::read(&out).unwrap();
    assert_eq!(&image[4096..8192], &[0x5A; 4096][..]);
}
