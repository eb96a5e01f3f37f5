//! The failover witness on a real etcd (its own ports and data directory):
//! one epoch never has two writers, even across primaries whose keys ran
//! out. Two sites' witnesses are driven directly, as two daemons would.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tidemark_failover::{Learnt, OnLearnt, Witness, WitnessSettings};
use tidemark_tests::etcd::Etcd;

fn witness(etcd: &Etcd, site: &str) -> Arc<Witness> {
    Witness::new(
        WitnessSettings {
            endpoints: vec![etcd.url.clone()],
            key: "/tidemark/epochs".into(),
            lease: Duration::from_secs(2),
            grace: Duration::from_millis(600),
        },
        site.into(),
    )
}

/// What a site's witness told it: the epochs of newer holders it learnt.
fn learner() -> (Arc<Mutex<Vec<u64>>>, OnLearnt) {
    let learnt = Arc::new(Mutex::new(Vec::new()));
    let sink = learnt.clone();
    (
        learnt,
        Arc::new(move |l: Learnt| {
            let Learnt::Newer(holder) = l;
            sink.lock().push(holder.epoch);
        }),
    )
}

/// `w.claim`, once the key a released holder's lease is being revoked
/// for has gone (the revoke runs in the background).
async fn claim_when_free(w: &Arc<Witness>, epoch: u64, learnt: &OnLearnt) -> Result<u64, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match w.claim("g", epoch, learnt.clone()).await {
            Err(e) if e.contains("held by") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

/// Site A holds group g at epoch 1, then its key goes (it died, or was
/// cut off). Site B takes over: not at epoch 1 again, which A wrote
/// under, but at 2. Then B's key goes too: A, back, must not hold g at
/// its old epoch — the witness says a newer epoch exists, and A learns it
/// (its daemon demotes) and never writes.
#[test]
fn a_primary_whose_key_ran_out_never_writes_under_an_epoch_a_takeover_passed() {
    let test = "a_primary_whose_key_ran_out_never_writes_under_an_epoch_a_takeover_passed";
    let Some(etcd) = Etcd::start(test) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (a, b) = (witness(&etcd, "a:7002"), witness(&etcd, "b:7002"));
        let (a_learnt, a_learner) = learner();
        let (_, b_learner) = learner();

        assert_eq!(a.claim("g", 1, a_learner.clone()).await, Ok(1));
        assert!(a.allows("g"));
        // While A holds the key, no takeover.
        let refused = b.claim("g", 1, b_learner.clone()).await.unwrap_err();
        assert!(refused.contains("held by a:7002 at epoch 1"), "{refused}");

        // A's key goes: B takes over above the epoch A wrote under.
        a.release("g");
        assert!(!a.allows("g"));
        assert_eq!(claim_when_free(&b, 1, &b_learner).await, Ok(2));
        assert!(b.allows("g"));

        // B's key goes. A comes back as the primary it was (epoch 1).
        b.release("g");
        a.hold("g", 1, a_learner.clone());
        let deadline = Instant::now() + Duration::from_secs(10);
        while a_learnt.lock().is_empty() {
            assert!(
                Instant::now() < deadline,
                "A was not told of the newer epoch within 10 s"
            );
            assert!(!a.allows("g"), "A holds g again at the epoch B passed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(*a_learnt.lock(), vec![2]);
        assert!(!a.allows("g"));

        // A takeover by A now goes above 2, and B, back, stands down.
        a.release("g");
        assert_eq!(claim_when_free(&a, 1, &a_learner).await, Ok(3));
        let refused = b.claim("g", 2, b_learner).await.unwrap_err();
        assert!(refused.contains("epoch 3"), "{refused}");
        a.release("g");
    });
}
