//! The archive as the daemon runs it (`[archive]`): one archiver per
//! consistency group (each works while this site is the group's primary),
//! their status for `archive status` and the metrics, and points of
//! volumes this site does not hold, served from the bucket.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tidemark_replicator::archive::{
    store, ArchiveStatus, ArchiveView, Archiver, Catalog, ObjectStore,
};
use tokio::sync::watch;

use super::error::{ApiError, ApiResult};
use super::registry::Registry;
use crate::config::ArchiveConfig;
use crate::point_spec::PointSpec;

/// How often the set of archivers is matched to the set of groups.
const SUPERVISE: Duration = Duration::from_secs(1);

/// The daemon's archive.
#[derive(Debug)]
pub struct ArchiveHost {
    /// The `[archive]` table.
    pub config: ArchiveConfig,
    store: Arc<dyn ObjectStore>,
    archivers: Mutex<BTreeMap<String, Archiver>>,
    cache_dir: PathBuf,
    runtime: tokio::runtime::Handle,
    /// Views open now, by volume and seq: every connection to the same
    /// point (nbdcopy opens several) shares one, with its caches.
    views: Mutex<HashMap<(String, u64), Weak<ArchiveView>>>,
}

impl ArchiveHost {
    /// Reaches the store and starts archiving every group, now and as
    /// groups come and go, until `stop`.
    pub async fn start(
        config: ArchiveConfig,
        registry: &Arc<Registry>,
        mut stop: watch::Receiver<bool>,
    ) -> ApiResult<Arc<ArchiveHost>> {
        let store = store::open(&config.location, &config.store)
            .await
            .map_err(|e| ApiError::Failed(e.to_string()))?;
        let cache_dir = registry.config().data_dir.join("archive-cache");
        // Views of an earlier run are gone with it.
        let _ = std::fs::remove_dir_all(&cache_dir);
        let host = Arc::new(ArchiveHost {
            config,
            store,
            archivers: Mutex::new(BTreeMap::new()),
            cache_dir,
            runtime: tokio::runtime::Handle::current(),
            views: Mutex::new(HashMap::new()),
        });
        let (weak_host, weak_registry) = (Arc::downgrade(&host), Arc::downgrade(registry));
        tokio::spawn(async move {
            loop {
                match (weak_host.upgrade(), weak_registry.upgrade()) {
                    (Some(host), Some(registry)) => host.supervise(&registry),
                    _ => break,
                }
                tokio::select! {
                    _ = tokio::time::sleep(SUPERVISE) => {}
                    _ = stop.changed() => break,
                }
            }
        });
        tracing::info!(archive = %host.store.location(), "archiving to the object store");
        Ok(host)
    }

    /// Starts an archiver for every group that has none and stops those
    /// of groups that are gone.
    fn supervise(&self, registry: &Registry) {
        let groups = registry.groups();
        let mut archivers = self.archivers.lock();
        archivers.retain(|name, _| groups.iter().any(|g| &g.name == name));
        for group in groups {
            if archivers.contains_key(&group.name) {
                continue;
            }
            let weak: Weak<super::registry::Group> = Arc::downgrade(&group);
            let archiver = Archiver::start(
                &group.name,
                group.journal().clone(),
                self.store.clone(),
                self.config.settings.clone(),
                Arc::new(move || weak.upgrade().is_some_and(|g| !g.is_replica())),
            );
            archivers.insert(group.name.clone(), archiver);
        }
    }

    /// The archive's URL.
    pub fn location(&self) -> String {
        self.store.location()
    }

    /// Every group's status, by group name.
    pub fn statuses(&self) -> Vec<ArchiveStatus> {
        self.archivers.lock().values().map(|a| a.status()).collect()
    }

    /// Stops every archiver (an upload in flight is abandoned; the index
    /// never names it).
    pub fn stop(&self) {
        self.archivers.lock().clear();
    }

    /// A view of `volume` at `seq` some connection holds open now.
    fn shared_view(&self, volume: &str, seq: u64) -> Option<Arc<ArchiveView>> {
        self.views
            .lock()
            .get(&(volume.to_string(), seq))
            .and_then(Weak::upgrade)
    }

    /// Volume `volume` at `point`, served from the archive (from a
    /// blocking thread).
    pub fn open_view(&self, volume: &str, point: &PointSpec) -> ApiResult<Arc<ArchiveView>> {
        let point = point.to_archive().map_err(ApiError::Invalid)?;
        let (store, cache_dir, cache) = (
            self.store.clone(),
            self.cache_dir.clone(),
            self.config.cache_bytes,
        );
        let name = volume.to_string();
        self.runtime
            .block_on(async move {
                let catalog = Arc::new(Catalog::for_volume(store, &name).await?);
                let seq = catalog.resolve(&name, &point).await?;
                if let Some(view) = self.shared_view(&name, seq) {
                    return Ok(view);
                }
                let view =
                    Arc::new(ArchiveView::open(catalog, &name, seq, &cache_dir, cache).await?);
                tracing::info!(volume = %name, seq, "archive view opened");
                let mut views = self.views.lock();
                views.retain(|_, v| v.strong_count() > 0);
                views.insert((name, seq), Arc::downgrade(&view));
                Ok(view)
            })
            .map_err(|e| match e {
                tidemark_replicator::archive::ArchiveError::Invalid(text) => {
                    ApiError::NotFound(text)
                }
                other => ApiError::Failed(other.to_string()),
            })
    }
}
