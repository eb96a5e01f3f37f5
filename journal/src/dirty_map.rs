//! The persistent dirty-region map: which regions of a volume may hold
//! changes that are not (yet) durable in the journal.
//!
//! A region is marked — durably, fsynced — before the production volume is
//! written, and cleared only once every change to it is durable in the
//! journal and the production volume has been flushed since. So after a
//! crash, every region where the journal could have missed a change is
//! marked, and re-reading those regions from the production volume
//! (a *resync*) closes every gap: the journal never silently misses a
//! change. Marking costs an fsync only when a region goes from clean to
//! dirty, so a hot region costs nothing per write (as DRBD's activity log).
//! Clearing is written without an fsync: a clear lost in a crash only
//! costs one needless resync.
//!
//! Each marked region also says which side leads it. A region written only
//! by sync writes since it was last clean is **journal-led**: every change
//! acknowledged to it is durable in the journal, so after a crash the
//! production volume is brought up to the journal's newest point there
//! (rolled forward) — and a flush need not fsync the production volume
//! while every marked region is journal-led: the journal already holds
//! everything a flush promises. An async write makes its regions
//! **production-led** (durably, before it writes): the production volume
//! may then hold changes the journal lacks, and after a crash those regions
//! are resynced from it, as before. (DRBD's activity log says where to
//! resync; this also says in which direction.)

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::fs::{Fs, FsFile, OpenMode};
use crate::point::Seq;
use crate::volume::VolumeInfo;

/// The first bytes of a dirty-region map file.
pub const DIRTY_MAGIC: [u8; 8] = *b"TDMKDRTY";

/// The dirty-map format this build writes (version 1, without the
/// journal-led bitmap, is read as every region production-led).
pub const DIRTY_VERSION: u32 = 2;

const HEADER_LEN: usize = 64;

/// Regions marked beyond a write's own when a mark costs an fsync anyway.
const MARK_AHEAD: usize = 15;

/// What the map knows of one region while the volume runs.
#[derive(Clone, Copy, Debug, Default)]
struct Region {
    /// Writes to the region begun and not yet settled.
    inflight: u32,
    /// Resyncs of the region begun and not yet settled: their records may
    /// still fail, so the region may not be cleared meanwhile.
    resyncing: u32,
    /// The newest seq of a record of a change to the region.
    newest_seq: Seq,
    /// A change to the region was not journalled (the cache was full): the
    /// region must be resynced before it can be clean.
    unjournaled: bool,
    /// The map's generation when a write to the region last settled; the
    /// region may be cleared only after a production flush that began
    /// later.
    generation: u64,
    /// The bit is set in the file.
    marked: bool,
    /// Marked, and journal-led: every change acknowledged to the region
    /// since it was clean is durable in the journal (its bit is set in the
    /// journal-led bitmap).
    led: bool,
    /// Writes marking (or relabelling) the region whose fsync has not
    /// answered: until it does, the mark is in memory only and no write
    /// may rely on it.
    marking: u32,
    /// A mark or relabel of the region failed to reach the disk: memory
    /// keeps it (the safe side), but the next write must make it durable
    /// before relying on it.
    unsynced: bool,
}

impl Region {
    /// Marked, nothing under way in it, and not written during the last
    /// `min_idle` generations before `flushed_generation`: a cleaning
    /// that flushed the production volume then may clear it, once the
    /// journal is durable through its newest record.
    fn clearable(&self, flushed_generation: u64, min_idle: u64) -> bool {
        self.marked
            && self.inflight == 0
            && self.marking == 0
            && self.resyncing == 0
            && !self.unjournaled
            && self.generation + min_idle <= flushed_generation
    }
}

struct State {
    regions: Vec<Region>,
    bitmap: Vec<u8>,
    /// The journal-led bitmap (meaningful for marked regions only).
    led: Vec<u8>,
    /// Marked regions that are production-led.
    production_led: usize,
    /// Regions with `unjournaled` set, so a flush asks in O(1).
    unjournaled: usize,
    /// Marked regions.
    marked: usize,
    generation: u64,
}

impl State {
    fn set_unjournaled(&mut self, r: usize, unjournaled: bool) {
        let Some(region) = self.regions.get_mut(r) else {
            return;
        };
        if region.unjournaled != unjournaled {
            region.unjournaled = unjournaled;
            if unjournaled {
                self.unjournaled += 1;
            } else {
                self.unjournaled -= 1;
            }
        }
    }

    fn set_led(&mut self, r: usize, led: bool) {
        let region = &mut self.regions[r];
        if region.marked && region.led != led {
            if led {
                self.production_led -= 1;
            } else {
                self.production_led += 1;
            }
        }
        region.led = led;
        if led {
            self.led[r / 8] |= 1 << (r % 8);
        } else {
            self.led[r / 8] &= !(1 << (r % 8));
        }
    }

    fn set_marked(&mut self, r: usize, marked: bool) {
        let region = &mut self.regions[r];
        if region.marked == marked {
            return;
        }
        region.marked = marked;
        if marked {
            self.marked += 1;
        } else {
            self.marked -= 1;
        }
        if !region.led {
            if marked {
                self.production_led += 1;
            } else {
                self.production_led -= 1;
            }
        }
        if marked {
            self.bitmap[r / 8] |= 1 << (r % 8);
        } else {
            self.bitmap[r / 8] &= !(1 << (r % 8));
        }
    }
}

/// The dirty-region map of one volume.
pub struct DirtyMap {
    path: PathBuf,
    file: Arc<dyn FsFile>,
    region_size: u64,
    /// Why every region was marked at open, if it was.
    assumed_dirty: Option<String>,
    state: Mutex<State>,
    /// Held while bitmap bytes are written and synced (see
    /// [`DirtyMap::persist`]).
    file_lock: Mutex<()>,
}

impl std::fmt::Debug for DirtyMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyMap")
            .field("path", &self.path)
            .field("region_size", &self.region_size)
            .finish()
    }
}

/// Encodes the map header.
///
/// Format (little-endian, 64 bytes): `{ [u8;8] magic "TDMKDRTY" |
/// u32 version | u32 header_len | u32 volume | u32 reserved |
/// u64 region_size | u64 regions | [u8;20] reserved | u32 crc32c(bytes 0..60) }`,
/// then one bit per region (bit r of byte r/8, least significant first):
/// marked; then (version 2) as many bytes again: journal-led.
fn encode_header(version: u32, volume: u32, region_size: u64, regions: u64) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    out[0..8].copy_from_slice(&DIRTY_MAGIC);
    out[8..12].copy_from_slice(&version.to_le_bytes());
    out[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    out[16..20].copy_from_slice(&volume.to_le_bytes());
    out[24..32].copy_from_slice(&region_size.to_le_bytes());
    out[32..40].copy_from_slice(&regions.to_le_bytes());
    let crc = crc32c::crc32c(&out[0..60]);
    out[60..64].copy_from_slice(&crc.to_le_bytes());
    out
}

impl DirtyMap {
    /// Opens the map of `volume` at `path`, creating an all-clean one if
    /// there is none. A map whose header does not match (damaged, or of
    /// another volume or region size) is replaced by an all-dirty one: a
    /// needless resync is safe, a missed one is not. Its regions are then
    /// journal-led if `journal_leads` (the volume writes in sync mode:
    /// what it acknowledged is in the journal), else production-led.
    pub fn open(
        fs: &dyn Fs,
        path: &Path,
        volume: &VolumeInfo,
        region_size: u64,
        journal_leads: bool,
    ) -> Result<Self> {
        if region_size == 0 || region_size % 4096 != 0 {
            return Err(Error::Invalid(format!(
                "dirty-map region size {region_size} must be a positive multiple of 4096"
            )));
        }
        let regions = volume.size.div_ceil(region_size);
        let bitmap_len = regions.div_ceil(8) as usize;
        let header = encode_header(DIRTY_VERSION, volume.id, region_size, regions);
        let header_v1 = encode_header(1, volume.id, region_size, regions);
        let all_dirty = || {
            let mut all = vec![0xffu8; bitmap_len];
            if regions % 8 != 0 {
                if let Some(last) = all.last_mut() {
                    *last = (1u8 << (regions % 8)) - 1;
                }
            }
            all
        };
        let mut created = false;
        let clean = || vec![0u8; bitmap_len];
        let assumed_led = || if journal_leads { all_dirty() } else { clean() };
        let (bitmap, led, assumed_dirty) = match crate::fs::read(fs, path) {
            Ok(bytes)
                if bytes.len() == HEADER_LEN + 2 * bitmap_len && bytes[..HEADER_LEN] == header =>
            {
                (
                    bytes[HEADER_LEN..HEADER_LEN + bitmap_len].to_vec(),
                    bytes[HEADER_LEN + bitmap_len..].to_vec(),
                    None,
                )
            }
            // Written before regions said which side leads: production.
            Ok(bytes)
                if bytes.len() == HEADER_LEN + bitmap_len && bytes[..HEADER_LEN] == header_v1 =>
            {
                (bytes[HEADER_LEN..].to_vec(), clean(), None)
            }
            // Made, but never written: no write went ahead before a map is
            // durable, so nothing can be dirty.
            Ok(bytes) if bytes.is_empty() => (clean(), clean(), None),
            Ok(_) => (
                all_dirty(),
                assumed_led(),
                Some(format!(
                    "dirty map {} does not match volume {}",
                    path.display(),
                    volume.name
                )),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                created = true;
                (clean(), clean(), None)
            }
            // What it held is unknown: every region may be dirty.
            Err(e) => (
                all_dirty(),
                assumed_led(),
                Some(format!("dirty map {} cannot be read ({e})", path.display())),
            ),
        };
        if let Some(why) = &assumed_dirty {
            tracing::warn!(map = %path.display(), volume = %volume.name, %why, "resyncing every region of the volume");
        }
        let file = fs
            .open(path, OpenMode::create())
            .map_err(|e| Error::io("open dirty map", path, e))?;
        let mut bytes = header.to_vec();
        bytes.extend_from_slice(&bitmap);
        bytes.extend_from_slice(&led);
        file.set_len(bytes.len() as u64)
            .and_then(|()| file.write_all_at(&bytes, 0))
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::io("write dirty map", path, e))?;
        if created {
            // The map must still be there after a power cut: a missing map
            // reads as all clean.
            fs.sync_dir(&crate::fs::parent_dir(path))
                .map_err(|e| Error::io("fsync directory", crate::fs::parent_dir(path), e))?;
        }
        let mut regions_state = vec![Region::default(); regions as usize];
        let mut production_led = 0;
        let mut marked = 0;
        for (r, region) in regions_state.iter_mut().enumerate() {
            region.marked = bitmap[r / 8] & (1 << (r % 8)) != 0;
            marked += usize::from(region.marked);
            region.led = led[r / 8] & (1 << (r % 8)) != 0;
            if region.marked && !region.led {
                production_led += 1;
            }
        }
        Ok(DirtyMap {
            path: path.to_path_buf(),
            file,
            region_size,
            assumed_dirty,
            file_lock: Mutex::new(()),
            state: Mutex::new(State {
                regions: regions_state,
                bitmap,
                led,
                production_led,
                unjournaled: 0,
                marked,
                generation: 1,
            }),
        })
    }

    /// Why every region was marked at open (the map could not be read,
    /// or did not match its volume), if so.
    pub fn assumed_dirty(&self) -> Option<&str> {
        self.assumed_dirty.as_deref()
    }

    /// The region size in bytes.
    pub fn region_size(&self) -> u64 {
        self.region_size
    }

    /// The regions `offset..offset+len` touches.
    pub fn regions_of(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<usize> {
        let first = (offset / self.region_size) as usize;
        let last = ((offset + len.max(1) - 1) / self.region_size) as usize;
        first..=last
    }

    /// Marks the regions of `offset..offset+len` before a write to them
    /// begins; returns once the marks are durable. `journal_leads`: the
    /// write is acknowledged only once its record is durable (sync); an
    /// async write makes its regions production-led first.
    pub fn begin(&self, offset: u64, len: u64, journal_leads: bool) -> Result<()> {
        let own = self.regions_of(offset, len);
        let mut state = self.state.lock();
        let mut newly = Vec::new();
        let mut relabelled = Vec::new();
        // Marked in memory by a write whose fsync has not answered yet:
        // this write may not go ahead on that mark either.
        let mut pending = false;
        for r in own.clone() {
            state.regions[r].inflight += 1;
            let region = state.regions[r];
            if !region.marked {
                newly.push(r);
            } else if region.led && !journal_leads {
                relabelled.push(r);
            } else if region.marking > 0 || region.unsynced {
                pending = true;
            }
        }
        if newly.is_empty() && relabelled.is_empty() && !pending {
            return Ok(());
        }
        // An fsync is due anyway: mark the next few regions too, so a
        // sequential stream pays one fsync per MARK_AHEAD regions, not one
        // per region. Unused marks are cleared by the next round.
        let after = *own.end() + 1;
        let end = (after + MARK_AHEAD).min(state.regions.len());
        newly.extend((after..end).filter(|&r| !state.regions[r].marked));
        for &r in &newly {
            state.set_led(r, journal_leads);
            state.set_marked(r, true);
        }
        for &r in &relabelled {
            state.set_led(r, false);
        }
        let touched: Vec<usize> = newly.iter().chain(&relabelled).copied().collect();
        for &r in &touched {
            state.regions[r].marking += 1;
        }
        let span = touched.iter().chain([own.start(), own.end()]);
        let first = span.clone().min().copied().unwrap_or(0) / 8;
        let last = span.max().copied().unwrap_or(0) / 8;
        // The fsync runs without the state lock, so writes that need no
        // mark (and settles, and flushes) are not held up behind it; the
        // regions it marks count as unmarked to them until it answers.
        drop(state);
        let result = self.persist(first, last);
        let mut state = self.state.lock();
        for &r in &touched {
            state.regions[r].marking -= 1;
        }
        if let Err(e) = result {
            // The write must not go ahead unrecorded. The marks and labels
            // stay in memory — another write may have relied on them and
            // made them durable meanwhile, and a mark or a production-led
            // label too many is only caution — but as unsynced: the next
            // write to these regions makes them durable first.
            for r in own {
                state.regions[r].inflight -= 1;
            }
            for &r in &touched {
                state.regions[r].unsynced = true;
            }
            return Err(Error::io_at(
                "mark dirty map",
                &self.path,
                (HEADER_LEN + first) as u64,
                e,
            ));
        }
        // Whatever memory held for these regions when the bytes were
        // copied is on disk now.
        for r in own.chain(touched) {
            state.regions[r].unsynced = false;
        }
        Ok(())
    }

    /// Writes bytes `first..=last` of both bitmaps as they are in memory
    /// now and makes them durable. One at a time: the bytes are read under
    /// the file lock, so a later write always carries every bit set before
    /// it (a stale copy can only re-set a bit a clean round cleared, which
    /// is safe).
    fn persist(&self, first: usize, last: usize) -> std::io::Result<()> {
        let _file = self.file_lock.lock();
        let (bitmap, led, led_at) = {
            let state = self.state.lock();
            (
                state.bitmap[first..=last].to_vec(),
                state.led[first..=last].to_vec(),
                HEADER_LEN + state.bitmap.len(),
            )
        };
        self.file
            .write_all_at(&bitmap, (HEADER_LEN + first) as u64)
            .and_then(|()| self.file.write_all_at(&led, (led_at + first) as u64))
            .and_then(|()| self.file.sync_data())
    }

    /// Begins a write like [`DirtyMap::begin`] if nothing needs an fsync:
    /// its regions are all marked already (and production-led, for an
    /// async write); false, and nothing begun, otherwise.
    pub fn try_begin(&self, offset: u64, len: u64, journal_leads: bool) -> bool {
        let mut state = self.state.lock();
        if self.regions_of(offset, len).any(|r| {
            let region = &state.regions[r];
            !region.marked
                || region.marking > 0
                || region.unsynced
                || (region.led && !journal_leads)
        }) {
            return false;
        }
        for r in self.regions_of(offset, len) {
            state.regions[r].inflight += 1;
        }
        true
    }

    /// True while some marked region is production-led: the production
    /// volume may then hold acknowledged changes only it has, and a flush
    /// must make it durable. False: every change acknowledged since the
    /// last flush that cleaned a region is durable in the journal, and a
    /// crash rolls the production volume forward to it.
    pub fn production_leads_somewhere(&self) -> bool {
        self.state.lock().production_led > 0
    }

    /// Settles a write begun with [`DirtyMap::begin`]: `journalled` is the
    /// seq of its record, or `None` if it could not be journalled (the
    /// region then waits for a resync), or if the write did not happen at
    /// all (`happened` false: nothing changed).
    pub fn settle(&self, offset: u64, len: u64, journalled: Option<Seq>, happened: bool) {
        let mut state = self.state.lock();
        let generation = state.generation;
        for r in self.regions_of(offset, len) {
            let region = &mut state.regions[r];
            region.inflight = region.inflight.saturating_sub(1);
            if !happened {
                continue;
            }
            region.generation = generation;
            match journalled {
                Some(seq) => region.newest_seq = region.newest_seq.max(seq),
                None => state.set_unjournaled(r, true),
            }
        }
    }

    /// Records that region `r` was re-read for a resync whose records (up
    /// to `seq`) are on their way to the journal: changes until now are
    /// covered by them, if they become durable. Called under the region's
    /// write lock; [`DirtyMap::resync_settle`] says how it ended.
    pub fn resync_begin(&self, r: usize, seq: Seq) {
        let mut state = self.state.lock();
        let generation = state.generation;
        state.set_unjournaled(r, false);
        if let Some(region) = state.regions.get_mut(r) {
            region.resyncing += 1;
            region.newest_seq = region.newest_seq.max(seq);
            region.generation = generation;
        }
    }

    /// Settles resyncs begun with [`DirtyMap::resync_begin`]: if their
    /// records are not all durable (`journalled` false: failed, or not in
    /// time), the regions wait for a resync again.
    pub fn resync_settle(&self, regions: &[usize], journalled: bool) {
        let mut state = self.state.lock();
        for &r in regions {
            if let Some(region) = state.regions.get_mut(r) {
                region.resyncing = region.resyncing.saturating_sub(1);
            }
            if !journalled {
                state.set_unjournaled(r, true);
            }
        }
    }

    /// Records that a write settled as journalled was not after all: the
    /// journal failed its record. Its regions wait for a resync again. (They
    /// are still marked: a region is cleared only once the journal is
    /// durable past its records, and a failed record is answered before
    /// any later one becomes durable.)
    pub fn unjournal(&self, offset: u64, len: u64) {
        let mut state = self.state.lock();
        for r in self.regions_of(offset, len) {
            state.set_unjournaled(r, true);
        }
    }

    /// Starts a cleaning round: returns a generation to pass to
    /// [`DirtyMap::clean`] after the production volume has been flushed.
    pub fn start_clean(&self) -> u64 {
        let mut state = self.state.lock();
        state.generation += 1;
        state.generation - 1
    }

    /// Whether [`DirtyMap::clean`] with these arguments could clear a
    /// region: one is marked, idle for `min_idle` generations before
    /// `flushed_generation` and not busy. When none is, the production
    /// flush a cleaning needs first would buy nothing.
    pub fn has_idle_marked(&self, flushed_generation: u64, min_idle: u64) -> bool {
        let state = self.state.lock();
        state
            .regions
            .iter()
            .any(|region| region.clearable(flushed_generation, min_idle))
    }

    /// Clears every marked region whose changes are all durable in the
    /// journal (`durable` is the journal's newest durable seq) and were
    /// flushed to the production volume (settled at or before
    /// `flushed_generation`), and that were not written during the last
    /// `min_idle` generations before it. Returns how many were cleared.
    pub fn clean(&self, durable: Seq, flushed_generation: u64, min_idle: u64) -> Result<usize> {
        let mut state = self.state.lock();
        let mut cleared = 0;
        for r in 0..state.regions.len() {
            let region = state.regions[r];
            if region.clearable(flushed_generation, min_idle) && region.newest_seq <= durable {
                state.set_marked(r, false);
                cleared += 1;
            }
        }
        if cleared > 0 {
            self.file
                .write_all_at(&state.bitmap, HEADER_LEN as u64)
                .map_err(|e| Error::io_at("clear dirty map", &self.path, HEADER_LEN as u64, e))?;
        }
        Ok(cleared)
    }

    /// Regions marked in the map (after a crash: every region that may hold
    /// a change the journal lacks, or lack one the journal holds).
    pub fn marked(&self) -> Vec<usize> {
        let state = self.state.lock();
        (0..state.regions.len())
            .filter(|&r| state.regions[r].marked)
            .collect()
    }

    /// The marked regions split by which side leads them: (journal-led,
    /// production-led). After a crash the first are rolled forward to the
    /// journal, the second resynced from the production volume.
    pub fn marked_by_leader(&self) -> (Vec<usize>, Vec<usize>) {
        let state = self.state.lock();
        (0..state.regions.len())
            .filter(|&r| state.regions[r].marked)
            .partition(|&r| state.regions[r].led)
    }

    /// Regions with a change that could not be journalled: they wait for a
    /// resync. Regions with a write in flight are left out unless
    /// `with_in_flight` (a flush must cover every acknowledged write, even
    /// in a region being written again).
    pub fn unjournaled(&self, with_in_flight: bool) -> Vec<usize> {
        let state = self.state.lock();
        if state.unjournaled == 0 {
            return Vec::new();
        }
        (0..state.regions.len())
            .filter(|&r| {
                state.regions[r].unjournaled && (with_in_flight || state.regions[r].inflight == 0)
            })
            .collect()
    }

    /// Whether some region waits for a resync (in flight or not): what
    /// [`DirtyMap::unjournaled`] with in-flight regions would list, in O(1).
    pub fn has_unjournaled(&self) -> bool {
        self.state.lock().unjournaled > 0
    }

    /// Regions that may hold a change not durable in the journal when the
    /// journal is durable through `durable`: one left to a resync, written
    /// or resynced right now, or with a record newer than `durable`.
    pub fn not_durable(&self, durable: Seq) -> Vec<usize> {
        let state = self.state.lock();
        (0..state.regions.len())
            .filter(|&r| {
                let region = &state.regions[r];
                region.unjournaled
                    || region.inflight > 0
                    || region.resyncing > 0
                    || region.newest_seq > durable
            })
            .collect()
    }

    /// Number of marked regions.
    pub fn marked_count(&self) -> usize {
        self.state.lock().marked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume() -> VolumeInfo {
        VolumeInfo {
            id: 3,
            name: "db".into(),
            size: 10 << 20,
        }
    }

    /// A new map of `volume()` in `dir`, 1 MiB regions.
    fn fresh_map(dir: &Path) -> DirtyMap {
        DirtyMap::open(
            &crate::fs::RealFs,
            &dir.join("m"),
            &volume(),
            1 << 20,
            false,
        )
        .expect("open")
    }

    /// A mark's fsync runs without the map's lock: writes to marked
    /// regions begin, and writes settle, while it is stalled; a write to a
    /// region whose mark is still on its way does not begin on it.
    #[test]
    fn a_slow_mark_holds_up_only_writes_that_need_it() {
        use crate::fs::faulty::{FaultyFs, FsOp};
        use std::time::{Duration, Instant};
        let dir = tempfile::tempdir().expect("tempdir");
        let fs = FaultyFs::new(Arc::new(crate::fs::RealFs));
        let map = Arc::new(
            DirtyMap::open(
                fs.as_ref(),
                &dir.path().join("m"),
                &volume(),
                1 << 20,
                false,
            )
            .expect("open"),
        );
        map.begin(0, 4096, true).expect("begin");
        map.settle(0, 4096, Some(1), true);
        // Only region 0 stays marked (its record is not durable yet).
        let g = map.start_clean();
        map.clean(0, g, 0).expect("clean");
        assert_eq!(map.marked(), vec![0]);
        fs.stall(FsOp::Sync, "m", Duration::from_millis(500));
        let far = 5u64 << 20;
        let marking = std::thread::spawn({
            let map = map.clone();
            move || map.begin(far, 4096, true)
        });
        std::thread::sleep(Duration::from_millis(100));
        let started = Instant::now();
        assert!(map.try_begin(0, 4096, true), "region 0 is marked");
        map.settle(0, 4096, Some(2), true);
        assert!(!map.has_unjournaled());
        assert!(
            !map.try_begin(far, 4096, true),
            "its mark is not durable yet"
        );
        assert!(
            started.elapsed() < Duration::from_millis(300),
            "held up behind the fsync: {:?}",
            started.elapsed()
        );
        marking.join().expect("join").expect("marked");
        assert!(map.try_begin(far, 4096, true), "marked now");
    }

    #[test]
    fn marks_survive_a_reopen_and_clear_only_when_durable_and_flushed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("3.map");
        let map =
            DirtyMap::open(&crate::fs::RealFs, &path, &volume(), 1 << 20, false).expect("open");
        map.begin(1 << 20, 3 << 20, false).expect("begin");
        map.settle(1 << 20, 3 << 20, Some(7), true);
        // Regions 1..=3 and, marked ahead in the same fsync, the rest.
        let all: Vec<usize> = (1..10).collect();
        assert_eq!(map.marked(), all);
        drop(map);

        let map =
            DirtyMap::open(&crate::fs::RealFs, &path, &volume(), 1 << 20, false).expect("reopen");
        assert_eq!(map.marked(), all, "marks are durable");
        map.begin(2 << 20, 100, false).expect("begin");
        map.settle(2 << 20, 100, Some(9), true);
        let generation = map.start_clean();
        assert_eq!(
            map.clean(8, generation, 0).expect("clean"),
            8,
            "seq 9 not durable yet"
        );
        assert_eq!(map.marked(), vec![2]);
        assert_eq!(map.clean(9, generation, 0).expect("clean"), 1);
        assert!(map.marked().is_empty());
    }

    #[test]
    fn background_cleaning_leaves_regions_written_since_the_last_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let map = fresh_map(dir.path());
        map.begin(0, 4096, false).expect("begin");
        map.settle(0, 4096, Some(1), true);
        let g = map.start_clean();
        map.clean(10, g, 1).expect("clean");
        assert!(
            map.marked().contains(&0),
            "written since the last cleaning: kept"
        );
        // Written again: still nothing to clean, so no flush is needed.
        map.begin(0, 4096, false).expect("begin");
        map.settle(0, 4096, Some(2), true);
        let g = map.start_clean();
        assert!(!map.has_idle_marked(g, 1), "every marked region is hot");
        map.clean(10, g, 1).expect("clean");
        assert_eq!(map.marked(), vec![0]);
        let g = map.start_clean();
        assert!(map.has_idle_marked(g, 1));
        map.clean(10, g, 1).expect("clean");
        assert!(
            !map.marked().contains(&0),
            "quiet for a generation: cleaned"
        );
    }

    #[test]
    fn unjournaled_changes_wait_for_a_resync() {
        let dir = tempfile::tempdir().expect("tempdir");
        let map = fresh_map(dir.path());
        map.begin(0, 4096, false).expect("begin");
        map.settle(0, 4096, None, true);
        let g = map.start_clean();
        assert_eq!(
            map.clean(100, g, 0).expect("clean"),
            9,
            "only the marks made ahead"
        );
        assert_eq!(map.marked(), vec![0]);
        assert_eq!(map.marked_count(), 1);
        assert_eq!(map.unjournaled(false), vec![0]);
        assert!(map.has_unjournaled());
        assert_eq!(map.not_durable(100), vec![0]);
        map.resync_begin(0, 5);
        assert!(!map.has_unjournaled(), "the resync covers it");
        let g = map.start_clean();
        assert_eq!(
            map.clean(5, g, 0).expect("clean"),
            0,
            "the resync's records may still fail"
        );
        map.resync_settle(&[0], true);
        assert_eq!(map.not_durable(4), vec![0]);
        assert!(map.not_durable(5).is_empty());
        let g = map.start_clean();
        assert_eq!(map.clean(5, g, 0).expect("clean"), 1);
        assert_eq!(map.marked_count(), 0);
    }

    #[test]
    fn a_failed_resync_or_record_leaves_the_region_to_a_resync() {
        let dir = tempfile::tempdir().expect("tempdir");
        let map = fresh_map(dir.path());
        map.begin(0, 4096, false).expect("begin");
        map.settle(0, 4096, None, true);
        map.resync_begin(0, 5);
        map.resync_settle(&[0], false);
        assert_eq!(map.unjournaled(false), vec![0]);
        assert!(map.has_unjournaled(), "a failed resync leaves it waiting");
        let g = map.start_clean();
        map.clean(100, g, 0).expect("clean");
        assert_eq!(map.marked(), vec![0], "the failed resync keeps the mark");

        map.begin(1 << 20, 4096, false).expect("begin");
        map.settle(1 << 20, 4096, Some(7), true);
        map.unjournal(1 << 20, 4096);
        let g = map.start_clean();
        map.clean(100, g, 0).expect("clean");
        assert_eq!(map.marked(), vec![0, 1], "a failed record keeps the mark");
        assert_eq!(map.not_durable(100), vec![0, 1]);
    }

    /// A map on a simulated disk behind a fault injector, for tests that
    /// fail its writes and then cut the power.
    struct FaultyMap {
        _local: tempfile::TempDir,
        sim: Arc<crate::fs::SimFs>,
        fs: Arc<crate::fs::FaultyFs>,
        map: DirtyMap,
    }

    const FAULTY_MAP: &str = "/3.map";

    fn faulty_map() -> FaultyMap {
        let local = tempfile::tempdir().expect("tempdir");
        let sim = crate::fs::SimFs::new(local.path());
        let fs = crate::fs::FaultyFs::new(sim.clone());
        let map = DirtyMap::open(
            fs.as_ref(),
            Path::new(FAULTY_MAP),
            &volume(),
            1 << 20,
            false,
        )
        .expect("open");
        FaultyMap {
            _local: local,
            sim,
            fs,
            map,
        }
    }

    impl FaultyMap {
        /// Cuts the power, dropping everything not durable, and opens the
        /// map again after the restart.
        fn after_power_cut(self) -> DirtyMap {
            self.sim
                .cut_power(crate::fs::PowerCut::dropping_everything(1));
            drop(self.map);
            self.sim.restart();
            DirtyMap::open(
                self.sim.as_ref(),
                Path::new(FAULTY_MAP),
                &volume(),
                1 << 20,
                false,
            )
            .expect("reopen")
        }
    }

    #[test]
    fn a_failed_relabel_is_made_again_by_the_next_async_write() {
        use crate::fs::FsOp;
        for op in [FsOp::Write, FsOp::Sync] {
            let faulty = faulty_map();
            let (map, fs) = (&faulty.map, &faulty.fs);
            map.begin(0, 4096, true).expect("sync write");
            map.settle(0, 4096, Some(1), true);
            fs.fail(op, "3.map", 5);
            map.begin(0, 4096, false)
                .expect_err("the relabel is not durable");
            assert!(
                map.production_leads_somewhere(),
                "{op:?}: memory keeps the relabel (the safe side)"
            );
            assert!(
                !map.try_begin(0, 4096, true),
                "{op:?}: not even a sync write may rely on a label not on disk"
            );
            assert!(
                !map.try_begin(0, 4096, false),
                "{op:?}: the next async write must make the relabel durable first"
            );
            fs.heal();
            map.begin(0, 4096, false).expect("relabelled");
            map.settle(0, 4096, None, true);
            let map = faulty.after_power_cut();
            assert_eq!(
                map.marked_by_leader().1,
                vec![0],
                "{op:?}: production-led on disk"
            );
        }
    }

    #[test]
    fn a_failed_mark_is_made_again_by_the_next_write() {
        use crate::fs::FsOp;
        for op in [FsOp::Write, FsOp::Sync] {
            let faulty = faulty_map();
            let (map, fs) = (&faulty.map, &faulty.fs);
            fs.fail(op, "3.map", 5);
            map.begin(0, 4096, false)
                .expect_err("the mark is not durable");
            assert!(
                !map.try_begin(0, 4096, false) && !map.try_begin(0, 4096, true),
                "{op:?}: no write may rely on a mark not on disk"
            );
            fs.heal();
            map.begin(0, 4096, false).expect("marked");
            map.settle(0, 4096, None, true);
            // The power fails now: the region must be marked on disk.
            let map = faulty.after_power_cut();
            assert!(map.marked().contains(&0), "{op:?}: {:?}", map.marked());
        }
    }

    #[test]
    fn an_unreadable_map_marks_everything_and_says_why() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("3.map");
        drop(DirtyMap::open(&crate::fs::RealFs, &path, &volume(), 1 << 20, false).expect("open"));
        let fs = crate::fs::FaultyFs::new(std::sync::Arc::new(crate::fs::RealFs));
        fs.fail(crate::fs::FsOp::Read, "3.map", 5);
        let map = DirtyMap::open(fs.as_ref(), &path, &volume(), 1 << 20, false).expect("open");
        assert_eq!(
            map.marked_count(),
            10,
            "a map that cannot be read is all dirty"
        );
        assert!(
            map.assumed_dirty().is_some_and(|why| why.contains("3.map")),
            "{:?}",
            map.assumed_dirty()
        );
    }

    #[test]
    fn a_damaged_map_marks_everything() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m");
        drop(DirtyMap::open(&crate::fs::RealFs, &path, &volume(), 1 << 20, false).expect("open"));
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[20] ^= 1;
        std::fs::write(&path, bytes).expect("write");
        let map =
            DirtyMap::open(&crate::fs::RealFs, &path, &volume(), 1 << 20, false).expect("open");
        assert_eq!(map.marked_count(), 10);
    }

    #[test]
    fn regions_say_which_side_leads_them_and_async_writes_hand_it_to_production() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("3.map");
        let map =
            DirtyMap::open(&crate::fs::RealFs, &path, &volume(), 1 << 20, false).expect("open");
        map.begin(0, 4096, true).expect("sync write");
        map.settle(0, 4096, Some(1), true);
        assert!(
            !map.production_leads_somewhere(),
            "sync writes alone: the journal leads every marked region"
        );
        assert!(
            map.try_begin(0, 4096, true),
            "marked: no fsync for a sync write"
        );
        map.settle(0, 4096, Some(2), true);
        assert!(
            !map.try_begin(0, 4096, false),
            "an async write to a journal-led region must relabel it durably first"
        );
        map.begin(0, 4096, false).expect("async write");
        map.settle(0, 4096, Some(3), true);
        assert!(map.production_leads_somewhere());
        assert!(
            map.try_begin(0, 4096, true),
            "a sync write leaves it production-led"
        );
        map.settle(0, 4096, Some(4), true);
        drop(map);

        let map =
            DirtyMap::open(&crate::fs::RealFs, &path, &volume(), 1 << 20, false).expect("reopen");
        let (led, production) = map.marked_by_leader();
        assert_eq!(production, vec![0], "the relabel was durable");
        assert_eq!(
            led,
            (1..10).collect::<Vec<_>>(),
            "marked ahead, journal-led"
        );
        let g = map.start_clean();
        map.clean(10, g, 0).expect("clean");
        assert!(map.marked().is_empty());
        assert!(
            !map.production_leads_somewhere(),
            "nothing marked, nothing led"
        );
        map.begin(0, 4096, true).expect("sync write");
        assert_eq!(
            map.marked_by_leader().1,
            Vec::<usize>::new(),
            "marked anew: journal-led"
        );
    }

    #[test]
    fn a_version_1_map_is_read_as_production_led_and_a_lost_one_as_the_mode_says() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("3.map");
        let regions = 10u64;
        let mut v1 = encode_header(1, 3, 1 << 20, regions).to_vec();
        v1.extend_from_slice(&[0b0000_0101, 0]);
        std::fs::write(&path, &v1).expect("write v1 map");
        let map =
            DirtyMap::open(&crate::fs::RealFs, &path, &volume(), 1 << 20, true).expect("open v1");
        assert_eq!(map.marked_by_leader(), (vec![], vec![0, 2]));
        drop(map);
        std::fs::write(&path, b"garbage").expect("damage");
        let map =
            DirtyMap::open(&crate::fs::RealFs, &path, &volume(), 1 << 20, true).expect("open");
        assert!(map.assumed_dirty().is_some());
        assert_eq!(
            map.marked_by_leader().0.len(),
            10,
            "a sync volume: the journal leads"
        );
        drop(map);
        std::fs::write(&path, b"garbage").expect("damage");
        let map =
            DirtyMap::open(&crate::fs::RealFs, &path, &volume(), 1 << 20, false).expect("open");
        assert_eq!(
            map.marked_by_leader().1.len(),
            10,
            "an async volume: production leads"
        );
    }
}
