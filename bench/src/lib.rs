//! Shared helpers for tidemark's benchmarks: payload generators and
//! journals set up the way the benches need them.
//!
//! The criterion benches live in `benches/`; the side-by-side scripts that
//! print a ratio against a peer (fio, nbdkit, cp) live next to this crate
//! as `*.sh` and call the binaries in `src/bin/`.

use std::path::Path;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tidemark_journal::{Journal, JournalOptions, Result};

/// What a benchmark payload looks like to lz4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    /// Text-like data that lz4 shrinks to about a third.
    Compressible,
    /// Random bytes: lz4 is tried and the record is stored raw.
    Incompressible,
}

impl Content {
    /// A short name for bench ids.
    pub fn name(self) -> &'static str {
        match self {
            Content::Compressible => "compressible",
            Content::Incompressible => "incompressible",
        }
    }
}

/// `len` bytes of `content`, reproducible from `seed`.
pub fn payload(content: Content, len: usize, seed: u64) -> Vec<u8> {
    let mut rng = SmallRng::seed_from_u64(seed);
    match content {
        Content::Incompressible => {
            let mut data = vec![0u8; len];
            rng.fill(&mut data[..]);
            data
        }
        Content::Compressible => {
            const WORDS: [&str; 12] = [
                "tidemark ",
                "journal ",
                "segment ",
                "record ",
                "volume ",
                "flush ",
                "point ",
                "seq ",
                "horizon ",
                "base ",
                "index ",
                "tag ",
            ];
            let mut data = Vec::with_capacity(len + 16);
            while data.len() < len {
                data.extend_from_slice(WORDS[rng.random_range(0..WORDS.len())].as_bytes());
                if rng.random_range(0..8) == 0 {
                    data.extend_from_slice(&rng.random::<u64>().to_le_bytes()[..3]);
                }
            }
            data.truncate(len);
            data
        }
    }
}

/// Opens a journal for benchmarking in `dir` with default (production)
/// options, but for the cache tiers, which `TIDEMARK_CACHE_TIERS`
/// (`memory`, `file`, `both`) may set.
pub fn open_journal(dir: &Path) -> Result<Journal> {
    let mut options = JournalOptions::default();
    if let Some(tiers) = std::env::var("TIDEMARK_CACHE_TIERS")
        .ok()
        .and_then(|t| t.parse().ok())
    {
        options.cache_tiers = tiers;
    }
    Journal::open(dir, options).map(|(journal, _)| journal)
}
