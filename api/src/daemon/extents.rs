//! A set of byte ranges of a volume — what is allocated, what changed —
//! and how NBD's block status describes a stretch of it: runs of "in the
//! set" and "not in it" covering the stretch exactly.

/// Merged, ascending `[start, end)` ranges within a volume of `size`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extents {
    spans: Vec<(u64, u64)>,
}

/// The longest run one block-status descriptor carries (a u32, kept
/// 4 KiB-aligned).
pub const MAX_RUN: u64 = (u32::MAX as u64) & !4095;

impl Extents {
    /// The set of `spans` (`[start, end)`, any order, may overlap),
    /// clipped to `size`.
    pub fn from_spans(spans: impl IntoIterator<Item = (u64, u64)>, size: u64) -> Extents {
        let mut all: Vec<(u64, u64)> = spans
            .into_iter()
            .map(|(s, e)| (s.min(size), e.min(size)))
            .filter(|(s, e)| s < e)
            .collect();
        all.sort_unstable();
        let mut spans: Vec<(u64, u64)> = Vec::with_capacity(all.len());
        for (s, e) in all {
            match spans.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => spans.push((s, e)),
            }
        }
        Extents { spans }
    }

    /// True if any byte of `[offset, offset + len)` is in the set.
    pub fn overlaps(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len);
        let i = self.spans.partition_point(|&(_, e)| e <= offset);
        self.spans.get(i).is_some_and(|&(s, _)| s < end)
    }

    /// The set's spans within `[offset, end)`, clipped to it.
    pub fn clipped(&self, offset: u64, end: u64) -> Vec<(u64, u64)> {
        let first = self.spans.partition_point(|&(_, e)| e <= offset);
        self.spans[first..]
            .iter()
            .take_while(|&&(s, _)| s < end)
            .map(|&(s, e)| (s.max(offset), e.min(end)))
            .collect()
    }

    /// `[offset, offset + len)` as runs of `(length, in the set)`, in
    /// order, covering it exactly, no run longer than [`MAX_RUN`]; only
    /// the first run if `one`.
    pub fn describe(&self, offset: u64, len: u64, one: bool) -> Vec<(u64, bool)> {
        let end = offset.saturating_add(len);
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let mut push = |length: u64, inside: bool| {
            if length == 0 {
                return;
            }
            match runs.last_mut() {
                Some(last) if last.1 == inside && last.0 + length <= MAX_RUN => last.0 += length,
                _ => {
                    let mut rest = length;
                    while rest > 0 {
                        let n = rest.min(MAX_RUN);
                        runs.push((n, inside));
                        rest -= n;
                    }
                }
            }
        };
        let mut at = offset;
        let first = self.spans.partition_point(|&(_, e)| e <= offset);
        for &(s, e) in &self.spans[first..] {
            if s >= end {
                break;
            }
            push(s.max(at) - at, false);
            let stop = e.min(end);
            push(stop - s.max(at), true);
            at = stop;
        }
        push(end.saturating_sub(at), false);
        if one {
            runs.truncate(1);
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_cover_the_stretch_exactly_and_merge() {
        let set = Extents::from_spans(
            [(8192, 12288), (0, 4096), (4096, 6000), (20000, 90000)],
            65536,
        );
        // Overlapping and touching spans merge; the last is clipped.
        assert_eq!(set.spans, vec![(0, 6000), (8192, 12288), (20000, 65536)]);
        assert_eq!(
            set.describe(0, 65536, false),
            vec![
                (6000, true),
                (2192, false),
                (4096, true),
                (7712, false),
                (45536, true)
            ]
        );
        assert_eq!(set.describe(6000, 100, false), vec![(100, false)]);
        assert_eq!(set.describe(5000, 4000, true), vec![(1000, true)]);
        assert!(set.overlaps(12000, 1000));
        assert!(!set.overlaps(12288, 7712));
        assert!(!Extents::default().overlaps(0, 1 << 40));
        assert_eq!(
            Extents::default().describe(0, 3 * MAX_RUN, false),
            vec![(MAX_RUN, false); 3]
        );
    }
}
