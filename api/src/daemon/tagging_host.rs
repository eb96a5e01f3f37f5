//! The daemon as the tagger's host: how tags reach the journal, which
//! volumes a rule names, and the throw-away exports verification checks.

use std::sync::Arc;

use tidemark_journal::{Point, Seq, Timestamp};
use tidemark_tagging::schedule::Target;
use tidemark_tagging::{Host, Tag, TagBody};

use super::registry::{Registry, Volume};

/// The registry, seen by the tagger.
#[derive(Debug)]
pub struct DaemonHost {
    registry: Arc<Registry>,
    nbd: std::net::SocketAddr,
}

impl DaemonHost {
    /// The host for `registry`, whose NBD server listens on `nbd`.
    pub fn new(registry: Arc<Registry>, nbd: std::net::SocketAddr) -> Self {
        DaemonHost { registry, nbd }
    }

    fn volume(&self, name: &str) -> Result<Arc<Volume>, String> {
        self.registry.volume(name).map_err(|e| e.to_string())
    }
}

/// Removes a named export when dropped.
struct ExportGuard {
    registry: Arc<Registry>,
    name: String,
}

impl Drop for ExportGuard {
    fn drop(&mut self) {
        let _ = self.registry.exports.remove(&self.name);
    }
}

impl Host for DaemonHost {
    fn volumes_of(&self, target: &Target) -> Vec<String> {
        match target {
            Target::Volume(v) => self
                .registry
                .volume(v)
                .map(|v| vec![v.name.clone()])
                .unwrap_or_default(),
            Target::Group(g) => self
                .registry
                .volumes()
                .iter()
                .filter(|v| &v.group.name == g)
                .map(|v| v.name.clone())
                .collect(),
        }
    }

    fn group_of(&self, volume: &str) -> Option<String> {
        self.registry
            .volume(volume)
            .ok()
            .map(|v| v.group.name.clone())
    }

    fn tag_now(&self, volume: &str, name: &str, body: TagBody) -> Result<Tag, String> {
        let v = self.volume(volume)?;
        self.registry
            .create_tag(&v, name, body)
            .map_err(|e| e.to_string())
    }

    fn tag_at(&self, volume: &str, name: &str, seq: Seq, body: TagBody) -> Result<Tag, String> {
        let v = self.volume(volume)?;
        self.registry
            .tag_at(&v, name, seq, body)
            .map_err(|e| e.to_string())
    }

    fn seq_at(&self, volume: &str, at: Timestamp) -> Result<(Seq, Timestamp), String> {
        let v = self.volume(volume)?;
        let seq = v
            .journal()
            .resolve(volume, Point::Time(at))
            .map_err(|e| e.to_string())?;
        Ok((seq, at))
    }

    fn tags(&self, volume: &str) -> Result<Vec<Tag>, String> {
        let v = self.volume(volume)?;
        self.registry.tags(&v).map_err(|e| e.to_string())
    }

    fn delete_tag(&self, volume: &str, name: &str) -> Result<(), String> {
        let v = self.volume(volume)?;
        self.registry
            .delete_tag(&v, name)
            .map_err(|e| e.to_string())
    }

    fn last_flush_before(&self, volume: &str, seq: Seq) -> Option<(Seq, Timestamp)> {
        let v = self.registry.volume(volume).ok()?;
        self.registry.last_flush_before(&v, seq).ok().flatten()
    }

    fn check_export(&self, volume: &str, seq: Seq) -> Result<(String, Box<dyn Send>), String> {
        let v = self.volume(volume)?;
        let export = self
            .registry
            .exports
            .create(v, seq, true)
            .map_err(|e| e.to_string())?;
        let uri = format!("nbd://{}/{}", self.nbd, export.name);
        let guard = ExportGuard {
            registry: self.registry.clone(),
            name: export.name.clone(),
        };
        Ok((uri, Box::new(guard)))
    }
}
