//! A witness on etcd, so two sites never both write a group. With two
//! sites a cut link looks like a dead primary; the witness breaks the tie.
//!
//! Per group, one key (`KEY/GROUP`) names the primary: `epoch=E site=ADDR`.
//! The primary holds it bound to a lease it keeps alive, and writes only
//! while it knows the lease is alive: it stops `grace` before the lease
//! could have run out since its last renewal, so by the time etcd drops
//! the key (and a takeover may claim it) the old primary has stopped.
//! A takeover claims the key with a compare-and-swap that succeeds only
//! while no one holds it; a live primary's key makes it fail. A second
//! key (`KEY/GROUP/epoch`, no lease) keeps the holder of the highest epoch
//! ever granted: every claim must be above it (or be that holder's own
//! again), so a primary whose key ran out never comes back under an epoch
//! a takeover has passed, and one epoch never has two writers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use parking_lot::Mutex;
use tokio::sync::watch;

/// `[failover.witness]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WitnessSettings {
    /// etcd endpoints (`http://HOST:PORT`).
    pub endpoints: Vec<String>,
    /// The key prefix; each group's key is `KEY/GROUP`.
    pub key: String,
    /// The lease's time to live.
    pub lease: Duration,
    /// How long before the lease could run out a primary stops writing.
    pub grace: Duration,
}

/// Who holds a group's key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// The epoch it writes under.
    pub epoch: u64,
    /// Its address.
    pub site: String,
}

impl Holder {
    fn encode(&self) -> String {
        format!("epoch={} site={}", self.epoch, self.site)
    }

    /// The holder a key's value names, if it names one.
    fn of(kv: &KeyValue) -> Option<Holder> {
        kv.value_str().ok().and_then(Holder::decode)
    }

    fn decode(text: &str) -> Option<Holder> {
        let mut epoch = None;
        let mut site = None;
        for part in text.split_whitespace() {
            match part.split_once('=') {
                Some(("epoch", e)) => epoch = e.parse().ok(),
                Some(("site", s)) => site = Some(s.to_string()),
                _ => {}
            }
        }
        Some(Holder {
            epoch: epoch?,
            site: site?,
        })
    }
}

/// What a group's holder learnt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Learnt {
    /// Another site holds the key at a higher epoch: demote.
    Newer(Holder),
}

/// What a site does when the witness tells it something (see [`Learnt`]).
pub type OnLearnt = Arc<dyn Fn(Learnt) + Send + Sync>;

/// The witness as one site sees it.
#[derive(Debug)]
pub struct Witness {
    settings: WitnessSettings,
    site: String,
    start: Instant,
    /// Per group held here: until when writes are allowed (ms since start).
    held: Mutex<HashMap<String, u64>>,
    /// Per group held here: the task keeping it.
    stops: Mutex<HashMap<String, watch::Sender<bool>>>,
    last_error: Mutex<Option<String>>,
}

impl Witness {
    /// The witness for this site (`site`: its address, written into keys).
    pub fn new(settings: WitnessSettings, site: String) -> Arc<Witness> {
        Arc::new(Witness {
            settings,
            site,
            start: Instant::now(),
            held: Mutex::new(HashMap::new()),
            stops: Mutex::new(HashMap::new()),
            last_error: Mutex::new(None),
        })
    }

    fn key(&self, group: &str) -> String {
        format!("{}/{group}", self.settings.key.trim_end_matches('/'))
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// True while this site may write `group`: it holds the key and its
    /// lease cannot have run out.
    pub fn allows(&self, group: &str) -> bool {
        self.held
            .lock()
            .get(group)
            .is_some_and(|&until| self.now_ms() < until)
    }

    /// The groups whose key this site has held, each with whether it holds
    /// it now (its lease cannot have run out), by name.
    pub fn holdings(&self) -> Vec<(String, bool)> {
        let now = self.now_ms();
        let mut out: Vec<(String, bool)> = self
            .held
            .lock()
            .iter()
            .map(|(g, &until)| (g.clone(), until > now))
            .collect();
        out.sort();
        out
    }

    /// A sentence for `status --json`.
    pub fn state(&self) -> String {
        let held: Vec<String> = {
            let now = self.now_ms();
            self.held
                .lock()
                .iter()
                .map(|(g, &until)| {
                    if until > now {
                        format!("{g}: held")
                    } else {
                        format!("{g}: lost")
                    }
                })
                .collect()
        };
        let mut text = format!("etcd {}", self.settings.endpoints.join(","));
        if !held.is_empty() {
            text.push_str(&format!(" ({})", held.join(", ")));
        }
        if let Some(e) = self.last_error.lock().clone() {
            text.push_str(&format!("; last error: {e}"));
        }
        text
    }

    async fn connect(&self) -> Result<Client, String> {
        let options = ConnectOptions::new()
            .with_connect_timeout(self.settings.lease / 2)
            .with_timeout(self.settings.lease / 2);
        Client::connect(&self.settings.endpoints, Some(options))
            .await
            .map_err(|e| {
                format!(
                    "cannot reach the witness at {}: {e}",
                    self.settings.endpoints.join(",")
                )
            })
    }

    fn ttl_secs(&self) -> i64 {
        self.settings.lease.as_secs_f64().ceil().max(1.0) as i64
    }

    /// `group`'s epoch key: the holder of the highest epoch ever granted,
    /// with no lease, so it outlives every holder's key.
    fn epoch_key(&self, group: &str) -> String {
        format!("{}/epoch", self.key(group))
    }

    /// Puts `holder` into `group`'s key under a new lease if no one holds
    /// it, or if it holds `holder`'s own site at an epoch not above
    /// `holder`'s — and in either case only if the witness never granted
    /// a higher epoch (or `holder`'s own to another site). Returns the
    /// lease, or who holds the key (or last held the highest epoch).
    async fn claim_with(
        &self,
        client: &mut Client,
        group: &str,
        holder: &Holder,
    ) -> Result<Result<i64, Holder>, String> {
        let key = self.key(group);
        let epoch_key = self.epoch_key(group);
        // A primary whose key ran out (it died, or lost the witness) must
        // not come back under an epoch a takeover has since passed.
        let recorded = client
            .get(epoch_key.clone(), None)
            .await
            .map_err(|e| format!("witness: cannot read {epoch_key}: {e}"))?
            .kvs()
            .first()
            .map(|kv| (Holder::of(kv), kv.mod_revision()));
        let epoch_revision = match recorded {
            None => 0,
            Some((None, _)) => {
                return Err(format!(
                    "witness: {epoch_key} holds something that is not a holder"
                ))
            }
            Some((Some(highest), revision)) => {
                if highest.epoch > holder.epoch
                    || (highest.epoch == holder.epoch && highest.site != holder.site)
                {
                    return Ok(Err(highest));
                }
                revision
            }
        };
        // The lease runs from before it is granted, as far as we know.
        let granted_at = self.now_ms();
        let lease = client
            .lease_grant(self.ttl_secs(), None)
            .await
            .map_err(|e| format!("witness: cannot grant a lease: {e}"))?
            .id();
        let puts = vec![
            TxnOp::put(
                key.clone(),
                holder.encode(),
                Some(PutOptions::new().with_lease(lease)),
            ),
            TxnOp::put(epoch_key.clone(), holder.encode(), None),
        ];
        let epoch_unchanged =
            Compare::mod_revision(epoch_key.clone(), CompareOp::Equal, epoch_revision);
        let free = Txn::new()
            .when(vec![
                Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                epoch_unchanged.clone(),
            ])
            .and_then(puts.clone())
            .or_else(vec![TxnOp::get(key.clone(), None)]);
        let response = client
            .txn(free)
            .await
            .map_err(|e| format!("witness: compare-and-swap on {key} failed: {e}"))?;
        if response.succeeded() {
            self.note_held(group, granted_at);
            return Ok(Ok(lease));
        }
        let current = response.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g
                .kvs()
                .first()
                .and_then(|kv| Holder::of(kv).map(|h| (h, kv.mod_revision()))),
            _ => None,
        });
        let Some((current, revision)) = current else {
            let _ = client.lease_revoke(lease).await;
            return Err(format!(
                "witness: {key} is free but {epoch_key} changed meanwhile (another claim); trying again"
            ));
        };
        // Our own key (a restart of this site): take it over under the
        // new lease, as long as no one changed it meanwhile.
        if current.site == holder.site && current.epoch <= holder.epoch {
            let mine = Txn::new()
                .when(vec![
                    Compare::mod_revision(key.clone(), CompareOp::Equal, revision),
                    epoch_unchanged,
                ])
                .and_then(puts);
            let response = client
                .txn(mine)
                .await
                .map_err(|e| format!("witness: compare-and-swap on {key} failed: {e}"))?;
            if response.succeeded() {
                self.note_held(group, granted_at);
                return Ok(Ok(lease));
            }
        }
        let _ = client.lease_revoke(lease).await;
        Ok(Err(current))
    }

    fn note_held(&self, group: &str, renewed_at: u64) {
        let until = renewed_at
            + self
                .settings
                .lease
                .saturating_sub(self.settings.grace)
                .as_millis() as u64;
        self.held.lock().insert(group.to_string(), until);
    }

    /// A takeover of `group` at `epoch` or above: wins only if no live
    /// primary holds the key, at the lowest epoch from `epoch` up that is
    /// above every epoch the witness ever granted (which it returns). On
    /// success this site holds the key from now on (see
    /// [`Witness::hold`]; `learnt` as there).
    pub async fn claim(
        self: &Arc<Self>,
        group: &str,
        epoch: u64,
        learnt: OnLearnt,
    ) -> Result<u64, String> {
        let mut client = self.connect().await?;
        let mut holder = Holder {
            epoch,
            site: self.site.clone(),
        };
        let mut attempts = 0;
        loop {
            attempts += 1;
            let outcome = match self.claim_with(&mut client, group, &holder).await {
                // Another claim moved the epoch key meanwhile: look again.
                Err(e) if attempts < 3 && e.contains("changed meanwhile") => continue,
                other => other?,
            };
            match outcome {
                Ok(lease) => {
                    self.keep(group, client, lease, holder.epoch, learnt);
                    return Ok(holder.epoch);
                }
                // The key is free but a takeover once went as high: go
                // above it (the free key says that primary is gone too).
                Err(highest)
                    if attempts < 3
                        && highest.epoch >= holder.epoch
                        && self.holder(&mut client, group).await?.is_none() =>
                {
                    holder.epoch = highest.epoch + 1;
                }
                Err(current) => {
                    return Err(format!(
                        "the witness says group {group} is held by {} at epoch {}: its primary is alive there, so no takeover",
                        current.site, current.epoch
                    ))
                }
            }
        }
    }

    /// Who holds `group`'s key now, if anyone.
    async fn holder(&self, client: &mut Client, group: &str) -> Result<Option<Holder>, String> {
        let key = self.key(group);
        let response = client
            .get(key.clone(), None)
            .await
            .map_err(|e| format!("witness: cannot read {key}: {e}"))?;
        Ok(response.kvs().first().and_then(Holder::of))
    }

    /// Holds `group`'s key for this site, a primary at `epoch()`, for as
    /// long as it is the primary: claims it (retrying while the witness is
    /// away), keeps the lease alive, claims it again when the lease is
    /// lost, and says when another site holds it at a higher epoch.
    pub fn hold(self: &Arc<Self>, group: &str, epoch: u64, learnt: OnLearnt) {
        if self.stops.lock().contains_key(group) {
            return;
        }
        let me = self.clone();
        let group = group.to_string();
        let (stop_tx, mut stop) = watch::channel(false);
        self.stops.lock().insert(group.clone(), stop_tx);
        tokio::spawn(async move {
            let holder = Holder {
                epoch,
                site: me.site.clone(),
            };
            loop {
                let attempt = async {
                    let mut client = me.connect().await?;
                    match me.claim_with(&mut client, &group, &holder).await? {
                        Ok(lease) => Ok(Some((client, lease))),
                        Err(current) if current.epoch > holder.epoch => {
                            learnt(Learnt::Newer(current));
                            Ok(None)
                        }
                        Err(current) => Err(format!(
                            "witness: group {group} is held by {} at epoch {}; waiting for it",
                            current.site, current.epoch
                        )),
                    }
                };
                let outcome = tokio::select! {
                    o = attempt => o,
                    _ = stop.changed() => return,
                };
                match outcome {
                    Ok(Some((client, lease))) => {
                        *me.last_error.lock() = None;
                        tracing::info!(group, epoch, "witness: this site holds the group");
                        if me.renew(&group, client, lease, &mut stop).await {
                            return;
                        }
                        tracing::warn!(
                            group,
                            "witness: the lease is lost; writes stop until it is held again"
                        );
                    }
                    Ok(None) => return,
                    Err(e) => {
                        tracing::warn!(group, error = %e, "witness: cannot hold the group");
                        *me.last_error.lock() = Some(e);
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(me.settings.lease / 4) => {}
                    _ = stop.changed() => return,
                }
            }
        });
    }

    /// After a successful claim: keeps the lease in a task of its own.
    fn keep(
        self: &Arc<Self>,
        group: &str,
        client: Client,
        lease: i64,
        epoch: u64,
        learnt: OnLearnt,
    ) {
        let me = self.clone();
        let group = group.to_string();
        let (stop_tx, mut stop) = watch::channel(false);
        if let Some(old) = self.stops.lock().insert(group.clone(), stop_tx) {
            let _ = old.send(true);
        }
        tokio::spawn(async move {
            if me.renew(&group, client, lease, &mut stop).await {
                return;
            }
            tracing::warn!(
                group,
                epoch,
                "witness: the lease is lost; writes stop until it is held again"
            );
            // Hold it again as any primary does.
            me.stops.lock().remove(&group);
            me.hold(&group, epoch, learnt);
        });
    }

    /// Renews `lease` until it is lost (false) or `stop` (true).
    async fn renew(
        &self,
        group: &str,
        mut client: Client,
        lease: i64,
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        let Ok((mut keeper, mut answers)) = client.lease_keep_alive(lease).await else {
            self.held.lock().remove(group);
            return false;
        };
        let every = self.settings.lease / 4;
        loop {
            let sent_at = self.now_ms();
            let renewed = async {
                keeper.keep_alive().await.ok()?;
                let answer = answers.message().await.ok()??;
                (answer.ttl() > 0).then_some(())
            };
            let renewed = tokio::select! {
                r = tokio::time::timeout(every.max(Duration::from_millis(50)), renewed) => r.ok().flatten(),
                _ = stop.changed() => {
                    self.held.lock().remove(group);
                    let _ = client.lease_revoke(lease).await;
                    return true;
                }
            };
            if renewed.is_some() {
                self.note_held(group, sent_at);
            } else if !self.allows(group) {
                self.held.lock().remove(group);
                return false;
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => {
                    self.held.lock().remove(group);
                    let _ = client.lease_revoke(lease).await;
                    return true;
                }
            }
        }
    }

    /// This site no longer holds `group` (demoted): the lease is revoked.
    pub fn release(&self, group: &str) {
        if let Some(stop) = self.stops.lock().remove(group) {
            let _ = stop.send(true);
        }
        self.held.lock().remove(group);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn holders_read_back_and_junk_is_not_one() {
        let h = Holder {
            epoch: 7,
            site: "10.0.0.1:7002".into(),
        };
        assert_eq!(Holder::decode(&h.encode()), Some(h));
        assert_eq!(Holder::decode("epoch=x site=y"), None);
        assert_eq!(Holder::decode(""), None);
    }
}
