//! Exports: what an NBD client (or `restore`) reads. `NAME` is the live
//! volume; `NAME@POINT` an instant read-only view of a point, read straight
//! from base image + journal; `tidemark export --writable` a view whose
//! writes go to a throw-away overlay.
//!
//! A view holds the journal's retention back at its point (a manifest
//! hold) for as long as it exists, so its history cannot be folded away
//! under a reader.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tidemark_journal::{Point, Seq};

use tidemark_replicator::archive::ArchiveView;

use super::error::{ApiError, ApiResult};
use super::extents::Extents;
use super::registry::{Volume, WritePass, WriterGuard};

/// Prefix of the journal holds that exports place.
pub const HOLD_PREFIX: &str = "export:";

const BLOCK: u64 = 4096;

/// What an export reads and writes.
#[derive(Debug)]
enum Target {
    /// The live volume, through the write path; counted as a writer of
    /// the volume while the export lives.
    Live { _writer: WriterGuard },
    /// The volume at `seq`, read-only.
    Point { seq: Seq },
    /// The volume at `seq` plus an overlay of writes.
    Overlay { seq: Seq, overlay: Overlay },
    /// A replica's live volume: its newest point, read-only (the primary
    /// writes it).
    ReplicaLive,
    /// A point of a volume this site does not hold, served from the
    /// archive.
    Archive(Arc<ArchiveView>),
}

/// One export.
#[derive(Debug)]
pub struct Export {
    /// Its name, as NBD clients give it.
    pub name: String,
    /// The name of the volume it shows.
    pub volume_name: String,
    size: u64,
    /// The volume it shows, when this site holds it (not for a point
    /// served from the archive).
    volume: Option<Arc<Volume>>,
    target: Target,
    hold: Option<String>,
    /// For a point: the ranges that may hold data, found once.
    written: std::sync::OnceLock<Extents>,
}

impl Export {
    /// The live volume `volume`, counted as a writer while this lives.
    pub fn live(volume: Arc<Volume>) -> Arc<Export> {
        let target = if volume.is_replica() {
            Target::ReplicaLive
        } else {
            Target::Live {
                _writer: WriterGuard::new(volume.clone()),
            }
        };
        Arc::new(Export {
            name: volume.name.clone(),
            volume_name: volume.name.clone(),
            size: volume.size,
            target,
            volume: Some(volume),
            hold: None,
            written: Default::default(),
        })
    }

    /// A point served from the archive, for one NBD connection.
    pub fn archived(name: &str, view: Arc<ArchiveView>) -> Arc<Export> {
        Arc::new(Export {
            name: name.to_string(),
            volume_name: view.volume().to_string(),
            size: view.size(),
            volume: None,
            target: Target::Archive(view),
            hold: None,
            written: Default::default(),
        })
    }

    /// The local volume; every target but `Archive` has one.
    fn local(&self) -> ApiResult<&Arc<Volume>> {
        self.volume.as_ref().ok_or_else(|| {
            ApiError::Invalid(format!(
                "export {} is served from the archive: read-only",
                self.name
            ))
        })
    }

    /// A view of `volume` at `seq`, holding retention there.
    fn view(
        name: String,
        volume: Arc<Volume>,
        seq: Seq,
        overlay: Option<Overlay>,
        hold: String,
    ) -> ApiResult<Arc<Export>> {
        volume.journal().set_hold(&hold, seq)?;
        let target = match overlay {
            Some(overlay) => Target::Overlay { seq, overlay },
            None => Target::Point { seq },
        };
        Ok(Arc::new(Export {
            name,
            volume_name: volume.name.clone(),
            size: volume.size,
            volume: Some(volume),
            target,
            hold: Some(hold),
            written: Default::default(),
        }))
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// True unless writes are accepted.
    pub fn read_only(&self) -> bool {
        matches!(
            self.target,
            Target::Point { .. } | Target::ReplicaLive | Target::Archive(_)
        ) || (self.is_live() && !self.volume_writable())
    }

    /// True for the live volume.
    pub fn is_live(&self) -> bool {
        matches!(self.target, Target::Live { .. })
    }

    /// The live volume a write of `len` bytes at `offset` goes to without
    /// blocking: `None` if the export is not live (the caller takes the
    /// blocking path), an error for a bad range or a demoted volume.
    /// The pass keeps a role change waiting until the write is appended.
    fn live_for_write(
        &self,
        offset: u64,
        len: u64,
    ) -> Option<ApiResult<(&Arc<Volume>, WritePass<'_>)>> {
        if let Err(e) = self.check(offset, len) {
            return Some(Err(e));
        }
        let Target::Live { .. } = self.target else {
            return None;
        };
        let volume = self.volume.as_ref()?;
        Some(
            volume
                .group
                .writing()
                .map(|pass| (volume, pass))
                .ok_or_else(|| self.demoted()),
        )
    }

    /// Writes `data` at `offset` only if that cannot block on a disk or a
    /// lock (see `WritePath::try_write`); `None` when it could, and then
    /// [`Export::write`] must be used where blocking is fine.
    pub fn try_write(&self, offset: u64, data: &Bytes) -> Option<ApiResult<()>> {
        let (volume, _pass) = match self.live_for_write(offset, data.len() as u64)? {
            Ok(live) => live,
            Err(e) => return Some(Err(e)),
        };
        let ack = volume
            .group
            .write_path
            .try_write_shared(&volume.name, offset, data)?;
        Some(match ack {
            Ok(ack) => {
                volume.observe_write(offset, data.len() as u64, &ack);
                Ok(())
            }
            Err(e) => Err(e.into()),
        })
    }

    /// Flushes (see [`Export::flush`]) only if that cannot block (see
    /// `WritePath::try_flush`); `None` when it could.
    pub fn try_flush(&self) -> Option<ApiResult<()>> {
        if let Target::Live { .. } = self.target {
            let volume = match self.local() {
                Ok(volume) => volume,
                Err(e) => return Some(Err(e)),
            };
            return Some(
                volume
                    .group
                    .write_path
                    .try_flush(&volume.name)?
                    .map(|_| ())
                    .map_err(Into::into),
            );
        }
        None
    }

    /// Starts a sync write of `data` at `offset` if that cannot block (see
    /// `WritePath::try_begin_sync`); `None` when it could, and then
    /// [`Export::write_shared`] must be used where blocking is fine.
    pub fn try_begin_sync(&self, offset: u64, data: &Bytes) -> Option<ApiResult<PendingWrite>> {
        let (volume, _pass) = match self.live_for_write(offset, data.len() as u64)? {
            Ok(live) => live,
            Err(e) => return Some(Err(e)),
        };
        let write = volume
            .group
            .write_path
            .try_begin_sync(&volume.name, offset, data)?;
        Some(match write {
            Ok(write) => Ok(PendingWrite {
                write,
                volume: volume.clone(),
                offset,
                len: data.len() as u64,
            }),
            Err(e) => Err(e.into()),
        })
    }

    /// The point a view shows.
    pub fn seq(&self) -> Option<Seq> {
        match &self.target {
            Target::Live { .. } | Target::ReplicaLive => None,
            Target::Point { seq } | Target::Overlay { seq, .. } => Some(*seq),
            Target::Archive(view) => Some(view.seq()),
        }
    }

    fn check(&self, offset: u64, len: u64) -> ApiResult<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.size()) {
            return Err(ApiError::Invalid(format!(
                "export {}: range offset {offset} length {len} is outside the volume (size {})",
                self.name,
                self.size()
            )));
        }
        Ok(())
    }

    fn read_point(&self, seq: Seq, offset: u64, buf: &mut [u8]) -> ApiResult<()> {
        // What no retained record wrote and the base image does not hold
        // reads as zeroes: no index walk for it. The map is made by the
        // first block-status request (copy tools ask before they read);
        // a first read never waits for it, so the first byte stays quick.
        if let Some(written) = self.written.get() {
            if !written.overlaps(offset, buf.len() as u64) {
                buf.fill(0);
                return Ok(());
            }
        }
        let volume = self.local()?;
        volume
            .journal()
            .read(&volume.name, offset, buf, Point::Seq(seq))?;
        Ok(())
    }

    /// The ranges of a point's volume that may hold data (found once per
    /// export: a point does not change).
    fn written_extents(&self) -> ApiResult<&Extents> {
        if let Some(extents) = self.written.get() {
            return Ok(extents);
        }
        let volume = self.local()?;
        let spans = volume.journal().written_extents(&volume.name)?;
        Ok(self
            .written
            .get_or_init(|| Extents::from_spans(spans, self.size)))
    }

    /// NBD's `base:allocation` of `[offset, offset + len)`: runs of
    /// `(length, may hold data)`, covering it exactly (only the first if
    /// `one`). A run said to be a hole reads as zeroes; the reverse need
    /// not hold.
    pub fn allocation(&self, offset: u64, len: u64, one: bool) -> ApiResult<Vec<(u64, bool)>> {
        self.check(offset, len)?;
        match &self.target {
            Target::Live { .. } => {
                // The production volume holds every acknowledged write
                // (live reads come from it too): its holes are the
                // volume's.
                let path = self.local()?.spec.lock().backing.clone();
                let spans = tidemark_journal::base::data_spans(&path, offset, offset + len)
                    .map_err(|e| {
                        ApiError::Failed(format!(
                            "export {}: cannot map the production volume {}: {e}",
                            self.name,
                            path.display()
                        ))
                    })?;
                Ok(Extents::from_spans(spans, self.size).describe(offset, len, one))
            }
            Target::Point { .. } => Ok(self.written_extents()?.describe(offset, len, one)),
            // An overlay's writes, a replica's moving newest point, a point
            // in the archive: all data, never wrong, only slower to copy.
            _ => {
                Ok(Extents::from_spans([(offset, offset + len)], self.size)
                    .describe(offset, len, one))
            }
        }
    }

    /// `extents` over `[offset, offset + len)` of this export, as
    /// [`Extents::describe`] gives it, once the range is checked.
    pub fn describe(
        &self,
        extents: &Extents,
        offset: u64,
        len: u64,
        one: bool,
    ) -> ApiResult<Vec<(u64, bool)>> {
        self.check(offset, len)?;
        if let Target::Overlay { overlay, .. } = &self.target {
            // A writable view's own writes changed it too; they come and
            // go with the connection, so they are looked up each time.
            let end = offset + len;
            let mut spans = extents.clipped(offset, end);
            spans.extend(overlay.written_spans(offset, end));
            return Ok(Extents::from_spans(spans, self.size()).describe(offset, len, one));
        }
        Ok(extents.describe(offset, len, one))
    }

    /// The ranges that changed after `since` up to the export's own point
    /// (the newest record for the live volume): what an incremental copy
    /// from `since` must take. Refused if retention has folded `since`
    /// away, as its changes are no longer told apart.
    pub fn changed_since(&self, since: Seq) -> ApiResult<Extents> {
        let volume = self.local()?;
        let journal = volume.journal();
        if let Some(seq) = self.seq() {
            if since > seq {
                return Err(ApiError::Invalid(format!(
                    "export {}: seq {since} is after the export's own point (seq {seq})",
                    self.name
                )));
            }
        }
        let mut spans = Vec::new();
        let upto = self.seq().unwrap_or(Seq::MAX);
        for span in journal.changed_between(&volume.name, since, upto)? {
            let (offset, length) = span?;
            spans.push((offset, offset + length));
        }
        let horizon = journal.history().horizon_seq;
        if horizon > since {
            return Err(ApiError::OutOfRange(format!(
                "volume {}: seq {since} is before the horizon (seq {horizon}): the changes since then were folded into the base image",
                volume.name
            )));
        }
        Ok(Extents::from_spans(spans, self.size))
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> ApiResult<()> {
        self.check(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        match &self.target {
            Target::Live { .. } => {
                let volume = self.local()?;
                Ok(volume.group.write_path.read(&volume.name, offset, buf)?)
            }
            Target::Point { seq } => self.read_point(*seq, offset, buf),
            Target::Overlay { seq, overlay } => {
                overlay.read(offset, buf, |at, part| self.read_point(*seq, at, part))
            }
            Target::ReplicaLive => {
                let volume = self.local()?;
                volume
                    .journal()
                    .read(&volume.name, offset, buf, Point::Latest)?;
                Ok(())
            }
            Target::Archive(view) => view
                .read(offset, buf)
                .map_err(|e| ApiError::Failed(format!("export {}: {e}", self.name))),
        }
    }

    /// The live volume takes writes: this site is its primary and, with
    /// a witness, holds the group's lease.
    fn volume_writable(&self) -> bool {
        self.volume
            .as_ref()
            .is_some_and(|v| !v.is_replica() && v.group.witness_allows())
    }

    fn demoted(&self) -> ApiError {
        match &self.volume {
            Some(volume) => ApiError::Invalid(volume.write_refusal()),
            None => ApiError::Invalid(format!("export {} is read-only", self.name)),
        }
    }

    fn refuse_read_only(&self) -> ApiResult<()> {
        Err(ApiError::Invalid(match self.target {
            Target::ReplicaLive => format!(
                "volume {} is a replica on this site: writes go to the primary",
                self.name
            ),
            Target::Archive(_) => format!(
                "export {} is a point served from the archive: read-only",
                self.name
            ),
            _ => format!("export {} is a read-only point-in-time view", self.name),
        }))
    }

    /// Writes `data` at `offset`.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> ApiResult<()> {
        self.check(offset, data.len() as u64)?;
        match &self.target {
            Target::Live { .. } => {
                let volume = self.local()?;
                // Demoted since the export opened: a newer primary writes
                // now. (The pass keeps a role change waiting until this
                // write is in the journal.)
                let Some(_pass) = volume.group.writing() else {
                    return Err(self.demoted());
                };
                let ack = volume
                    .group
                    .write_path
                    .write(&volume.name, offset, data, fua)?;
                volume.observe_write(offset, data.len() as u64, &ack);
                Ok(())
            }
            Target::Point { .. } | Target::ReplicaLive | Target::Archive(_) => {
                self.refuse_read_only()
            }
            Target::Overlay { seq, overlay } => {
                overlay.write(offset, data, |at, part| self.read_point(*seq, at, part))
            }
        }
    }

    /// [`Export::write`] of a shared buffer, which the write's journal
    /// records share rather than copy.
    pub fn write_shared(&self, offset: u64, data: &Bytes, fua: bool) -> ApiResult<()> {
        match &self.target {
            Target::Live { .. } => {
                self.check(offset, data.len() as u64)?;
                let volume = self.local()?;
                let Some(_pass) = volume.group.writing() else {
                    return Err(self.demoted());
                };
                let ack = volume
                    .group
                    .write_path
                    .write_shared(&volume.name, offset, data, fua)?;
                volume.observe_write(offset, data.len() as u64, &ack);
                Ok(())
            }
            _ => self.write(offset, data, fua),
        }
    }

    /// Sets `len` bytes at `offset` to zero (`trim` only drops them).
    pub fn zero(&self, offset: u64, len: u64, fua: bool, trim: bool) -> ApiResult<()> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        match &self.target {
            Target::Live { .. } => {
                let volume = self.local()?;
                let Some(_pass) = volume.group.writing() else {
                    return Err(self.demoted());
                };
                let wp = &volume.group.write_path;
                let ack = if trim {
                    wp.trim(&volume.name, offset, len)?
                } else {
                    wp.write_zeroes(&volume.name, offset, len, fua)?
                };
                volume.observe_free(offset, len, &ack);
                Ok(())
            }
            Target::Point { .. } | Target::ReplicaLive | Target::Archive(_) => {
                self.refuse_read_only()
            }
            Target::Overlay { .. } => {
                let zeros = vec![0u8; len.min(1 << 20) as usize];
                let mut at = offset;
                while at < offset + len {
                    let n = (offset + len - at).min(zeros.len() as u64) as usize;
                    self.write(at, &zeros[..n], false)?;
                    at += n as u64;
                }
                Ok(())
            }
        }
    }

    /// Makes acknowledged writes durable; on the live volume also records
    /// a flush point.
    pub fn flush(&self) -> ApiResult<()> {
        if let Target::Live { .. } = self.target {
            let volume = self.local()?;
            volume.group.write_path.flush_acknowledged(&volume.name)?;
        }
        Ok(())
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        if let (Some(hold), Some(volume)) = (&self.hold, &self.volume) {
            if let Err(e) = volume.journal().release_hold(hold) {
                tracing::warn!(export = %self.name, error = %e, "could not release the export's retention hold");
            }
        }
    }
}

/// Writes to a writable view: a sparse file the size of the volume and a
/// bitmap of the 4 KiB blocks written. Deleted with the export.
#[derive(Debug)]
struct Overlay {
    path: PathBuf,
    file: File,
    written: Mutex<Vec<u64>>,
}

impl Overlay {
    fn create(path: PathBuf, size: u64) -> ApiResult<Overlay> {
        let failed = |e: std::io::Error| {
            ApiError::Failed(format!("cannot create overlay {}: {e}", path.display()))
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(failed)?;
        file.set_len(size).map_err(failed)?;
        let blocks = size.div_ceil(BLOCK);
        Ok(Overlay {
            written: Mutex::new(vec![0; blocks.div_ceil(64) as usize]),
            path,
            file,
        })
    }

    fn is_set(bits: &[u64], block: u64) -> bool {
        bits[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    /// The written blocks overlapping `[offset, end)` as merged
    /// `[start, end)` spans.
    fn written_spans(&self, offset: u64, end: u64) -> Vec<(u64, u64)> {
        let bits = self.written.lock();
        let mut spans: Vec<(u64, u64)> = Vec::new();
        let (mut block, last) = (offset / BLOCK, end.div_ceil(BLOCK));
        while block < last {
            if block % 64 == 0 && bits[(block / 64) as usize] == 0 {
                // A word of unwritten blocks at once: a map of a large,
                // mostly unwritten view stays quick.
                block += 64;
                continue;
            }
            if Self::is_set(&bits, block) {
                let (start, stop) = (block * BLOCK, (block + 1) * BLOCK);
                match spans.last_mut() {
                    Some(last) if last.1 == start => last.1 = stop,
                    _ => spans.push((start, stop)),
                }
            }
            block += 1;
        }
        spans
    }

    fn io_error(&self, what: &str, offset: u64, e: std::io::Error) -> ApiError {
        ApiError::Failed(format!(
            "cannot {what} overlay {} at offset {offset}: {e}",
            self.path.display()
        ))
    }

    /// Reads from the overlay where it was written and from `base`
    /// elsewhere, run by run.
    fn read(
        &self,
        offset: u64,
        buf: &mut [u8],
        mut base: impl FnMut(u64, &mut [u8]) -> ApiResult<()>,
    ) -> ApiResult<()> {
        let bits = self.written.lock();
        let end = offset + buf.len() as u64;
        let mut at = offset;
        while at < end {
            let block = at / BLOCK;
            let in_overlay = Self::is_set(&bits, block);
            let mut run_end = ((block + 1) * BLOCK).min(end);
            while run_end < end && Self::is_set(&bits, run_end / BLOCK) == in_overlay {
                run_end = (run_end + BLOCK).min(end);
            }
            let part = &mut buf[(at - offset) as usize..(run_end - offset) as usize];
            if in_overlay {
                self.file
                    .read_exact_at(part, at)
                    .map_err(|e| self.io_error("read", at, e))?;
            } else {
                base(at, part)?;
            }
            at = run_end;
        }
        Ok(())
    }

    /// Writes into the overlay; partly written blocks are first filled
    /// from `base` so the overlay always holds whole blocks.
    fn write(
        &self,
        offset: u64,
        data: &[u8],
        mut base: impl FnMut(u64, &mut [u8]) -> ApiResult<()>,
    ) -> ApiResult<()> {
        let mut bits = self.written.lock();
        let end = offset + data.len() as u64;
        let first = offset / BLOCK;
        let last = end.div_ceil(BLOCK);
        let size = self.file.metadata().map(|m| m.len()).unwrap_or(end);
        for block in [first, last.saturating_sub(1)] {
            let start = block * BLOCK;
            let block_end = (start + BLOCK).min(size);
            let partial = offset > start || end < block_end;
            if partial && !Self::is_set(&bits, block) {
                let mut fill = vec![0u8; (block_end - start) as usize];
                base(start, &mut fill)?;
                self.file
                    .write_all_at(&fill, start)
                    .map_err(|e| self.io_error("write", start, e))?;
                bits[(block / 64) as usize] |= 1 << (block % 64);
            }
        }
        self.file
            .write_all_at(data, offset)
            .map_err(|e| self.io_error("write", offset, e))?;
        for block in first..last {
            bits[(block / 64) as usize] |= 1 << (block % 64);
        }
        Ok(())
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The exports made with `tidemark export`, by name.
#[derive(Debug)]
pub struct Exports {
    dir: PathBuf,
    table: Mutex<BTreeMap<String, Arc<Export>>>,
    counter: AtomicU64,
}

impl Exports {
    /// An empty table whose overlays live in `dir`.
    pub fn new(dir: PathBuf) -> Self {
        // Overlays of an earlier run are throw-away by definition.
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Exports {
            dir,
            table: Mutex::new(BTreeMap::new()),
            counter: AtomicU64::new(0),
        }
    }

    fn next(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A view of `volume` at `seq` made for one NBD connection (not in the
    /// table; gone when the client disconnects).
    pub fn transient(&self, name: &str, volume: Arc<Volume>, seq: Seq) -> ApiResult<Arc<Export>> {
        let hold = format!("{HOLD_PREFIX}{name}#{}", self.next());
        Export::view(name.to_string(), volume, seq, None, hold)
    }

    /// Makes (or finds) a named export of `volume` at `seq`.
    pub fn create(&self, volume: Arc<Volume>, seq: Seq, writable: bool) -> ApiResult<Arc<Export>> {
        let mut table = self.table.lock();
        if !writable {
            let name = format!("{}@{seq}", volume.name);
            if let Some(existing) = table.get(&name) {
                return Ok(existing.clone());
            }
            let hold = format!("{HOLD_PREFIX}{name}");
            let export = Export::view(name.clone(), volume, seq, None, hold)?;
            table.insert(name, export.clone());
            return Ok(export);
        }
        let n = self.next();
        let name = format!("{}@{seq}.overlay-{n}", volume.name);
        let overlay = Overlay::create(self.dir.join(format!("{n}.overlay")), volume.size)?;
        let hold = format!("{HOLD_PREFIX}{name}");
        let export = Export::view(name.clone(), volume, seq, Some(overlay), hold)?;
        table.insert(name, export.clone());
        Ok(export)
    }

    /// The named export `name`, if there is one.
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        self.table.lock().get(name).cloned()
    }

    /// Removes export `name`; clients still connected keep it until they
    /// disconnect.
    pub fn remove(&self, name: &str) -> ApiResult<()> {
        let mut table = self.table.lock();
        if table.remove(name).is_some() {
            return Ok(());
        }
        let known: Vec<&String> = table.keys().collect();
        Err(ApiError::NotFound(if known.is_empty() {
            format!("no export named {name:?} (there are no exports)")
        } else {
            format!(
                "no export named {name:?}; exports: {}",
                known
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }))
    }

    /// Every named export.
    pub fn list(&self) -> Vec<Arc<Export>> {
        self.table.lock().values().cloned().collect()
    }

    /// Names of the exports of `volume`.
    pub fn of_volume(&self, volume: &str) -> Vec<String> {
        self.table
            .lock()
            .values()
            .filter(|e| e.volume_name == volume)
            .map(|e| e.name.clone())
            .collect()
    }

    /// Drops every named export.
    pub fn clear(&self) {
        self.table.lock().clear();
    }
}

/// A sync write to a live volume whose record and production write are
/// done, waiting for the record to be durable (see
/// [`Export::try_begin_sync`]).
#[derive(Debug)]
pub struct PendingWrite {
    write: tidemark_journal::SyncWrite,
    volume: Arc<Volume>,
    offset: u64,
    len: u64,
}

impl PendingWrite {
    /// Whether finishing may block; then [`PendingWrite::wait`] it where
    /// blocking is fine.
    pub fn blocks(&self) -> bool {
        self.write.blocks()
    }

    /// Whether settling must wait for a replica (and so may block).
    pub fn waits_for_replica(&mut self) -> bool {
        self.write.waits_for_replica()
    }

    /// How long it may still wait for durability.
    pub fn time_left(&self) -> std::time::Duration {
        self.write.time_left()
    }

    /// Resolves when the record is durable (or failed).
    pub async fn durable(&mut self) -> tidemark_journal::Result<()> {
        self.write.durable().await
    }

    /// Acknowledges once [`PendingWrite::durable`] answered (`None`: it did
    /// not in time).
    pub fn settle(self, durable: Option<tidemark_journal::Result<()>>) -> ApiResult<()> {
        let ack = self.write.settle(durable)?;
        self.volume.observe_write(self.offset, self.len, &ack);
        Ok(())
    }

    /// Waits and acknowledges, blocking.
    pub fn wait(self) -> ApiResult<()> {
        let ack = self.write.wait()?;
        self.volume.observe_write(self.offset, self.len, &ack);
        Ok(())
    }
}
