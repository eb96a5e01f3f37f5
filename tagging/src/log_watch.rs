//! Log rules: follow a log file (across rotation and truncation), match
//! each new line against patterns, and tag the point at which a matching
//! line appeared.
//!
//! Following is by polling: each round reads what was appended since the
//! last one; a file renamed away (rotation) is read to its end before the
//! new file at the path is followed from its start; a file that shrank
//! (truncation) is read again from its start. A file that does not exist
//! yet is picked up when it appears.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use regex::Regex;

use crate::schedule::Target;

/// One log rule: a file and the patterns that tag it.
#[derive(Clone, Debug)]
pub struct LogRule {
    /// The rule's name (for messages).
    pub name: String,
    /// What it tags.
    pub target: Target,
    /// The log file.
    pub file: PathBuf,
    /// Tag name prefix and pattern, per pattern: a line matching one gives
    /// a tag `log:PREFIX-TIME`.
    pub patterns: Vec<(String, Regex)>,
}

/// Built-in rule sets: (tag prefix, pattern).
pub fn builtin(set: &str) -> Result<Vec<(String, Regex)>, String> {
    let rules: &[(&str, &str)] = match set {
        "postgresql" => &[
            ("pg-checkpoint", r"checkpoint complete"),
            ("pg-shutdown", r"database system is shut down"),
            (
                "pg-recovery-finished",
                r"redo done at|archive recovery complete|database system is ready to accept connections",
            ),
        ],
        "mysql" => &[
            (
                "mysql-shutdown",
                r"InnoDB: Shutdown completed|\[Server\] .*Shutdown complete|mysqld: Shutdown complete",
            ),
            ("mysql-ready", r"ready for connections"),
            ("innodb-checkpoint", r"InnoDB: .*[Cc]heckpoint"),
        ],
        "syslog" => &[
            (
                "syslog-shutdown",
                r"System is going down|Reached target .*(Shutdown|Power-Off)|systemd-shutdown",
            ),
            (
                "syslog-disk-error",
                r"I/O error|EXT4-fs error|XFS .*[Ee]rror|blk_update_request: .*error",
            ),
            ("syslog-oom", r"Out of memory: Killed process"),
        ],
        other => {
            return Err(format!(
                "{other:?} is not a built-in rule set (postgresql, mysql, syslog)"
            ))
        }
    };
    rules
        .iter()
        .map(|(name, pattern)| {
            Regex::new(pattern)
                .map(|r| (name.to_string(), r))
                .map_err(|e| e.to_string())
        })
        .collect()
}

/// Follows one file.
#[derive(Debug)]
pub struct Follower {
    path: PathBuf,
    file: Option<File>,
    inode: u64,
    offset: u64,
    partial: Vec<u8>,
    /// The file was missing at the last look (for a one-time warning).
    pub missing: bool,
}

/// Longest partial line kept while waiting for its end.
const MAX_LINE: usize = 1 << 20;

impl Follower {
    /// Follows `path` from its current end (lines already there are not
    /// new); a file that is not there yet is read from its start once it
    /// appears.
    pub fn new(path: &Path) -> Follower {
        let mut f = Follower {
            path: path.to_path_buf(),
            file: None,
            inode: 0,
            offset: 0,
            partial: Vec::new(),
            missing: false,
        };
        if let Ok(file) = File::open(path) {
            if let Ok(meta) = file.metadata() {
                f.inode = meta.ino();
                f.offset = meta.len();
                f.file = Some(file);
            }
        } else {
            f.missing = true;
        }
        f
    }

    /// The path followed.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The complete lines appended since the last call.
    pub fn poll(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        self.drain(&mut lines);
        match std::fs::metadata(&self.path) {
            Ok(meta) if self.file.is_none() || meta.ino() != self.inode => {
                // Appeared, or rotated: the old file is drained; follow
                // the new one from its start.
                self.missing = false;
                self.partial.clear();
                if let Ok(file) = File::open(&self.path) {
                    self.inode = meta.ino();
                    self.offset = 0;
                    self.file = Some(file);
                    self.drain(&mut lines);
                }
            }
            Ok(meta) if meta.len() < self.offset => {
                // Truncated in place.
                self.offset = 0;
                self.partial.clear();
                self.drain(&mut lines);
            }
            Ok(_) => {}
            Err(_) => self.missing = true,
        }
        lines
    }

    fn drain(&mut self, lines: &mut Vec<String>) {
        let Some(file) = self.file.as_mut() else {
            return;
        };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        if file.take(16 << 20).read_to_end(&mut buf).is_err() {
            return;
        }
        self.offset += buf.len() as u64;
        self.partial.extend_from_slice(&buf);
        let mut start = 0;
        while let Some(end) = memchr::memchr(b'\n', &self.partial[start..]) {
            let line = &self.partial[start..start + end];
            lines.push(
                String::from_utf8_lossy(line)
                    .trim_end_matches('\r')
                    .to_string(),
            );
            start += end + 1;
        }
        self.partial.drain(..start);
        if self.partial.len() > MAX_LINE {
            lines.push(String::from_utf8_lossy(&self.partial).into_owned());
            self.partial.clear();
        }
    }
}

impl LogRule {
    /// The tag prefix of the first pattern `line` matches.
    pub fn matches(&self, line: &str) -> Option<&str> {
        self.patterns
            .iter()
            .find(|(_, re)| re.is_match(line))
            .map(|(name, _)| name.as_str())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Write;

    fn append(path: &Path, text: &str) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn follows_appends_rotation_truncation_and_late_files() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("app.log");
        append(&log, "old line\n");
        let mut f = Follower::new(&log);
        assert!(
            f.poll().is_empty(),
            "lines present at the start are not new"
        );
        append(&log, "one\ntw");
        assert_eq!(f.poll(), ["one"]);
        append(&log, "o\n");
        assert_eq!(f.poll(), ["two"]);
        // Rotation: the rest of the old file, then the new one.
        append(&log, "last of old\n");
        std::fs::rename(&log, dir.path().join("app.log.1")).unwrap();
        append(&log, "first of new\n");
        assert_eq!(f.poll(), ["last of old", "first of new"]);
        // Truncation in place.
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&log)
            .unwrap();
        assert!(f.poll().is_empty());
        append(&log, "after truncate\n");
        assert_eq!(f.poll(), ["after truncate"]);
        // A file that appears later is read from its start.
        let late = dir.path().join("late.log");
        let mut g = Follower::new(&late);
        assert!(g.missing);
        assert!(g.poll().is_empty());
        append(&late, "hello\n");
        assert_eq!(g.poll(), ["hello"]);
        assert!(!g.missing);
    }

    #[test]
    fn builtin_sets_match_what_the_servers_print() {
        let pg = LogRule {
            name: "pg".into(),
            target: Target::Volume("db".into()),
            file: "/dev/null".into(),
            patterns: builtin("postgresql").unwrap(),
        };
        assert_eq!(
            pg.matches("2026-11-21 10:41:07 UTC [27] LOG:  checkpoint complete: wrote 3 buffers"),
            Some("pg-checkpoint")
        );
        assert_eq!(
            pg.matches("LOG:  database system is shut down"),
            Some("pg-shutdown")
        );
        assert_eq!(
            pg.matches("LOG:  redo done at 0/1A2B3C"),
            Some("pg-recovery-finished")
        );
        assert_eq!(pg.matches("LOG:  statement: select 1"), None);
        let my = builtin("mysql").unwrap();
        assert!(my.iter().any(|(_, r)| r.is_match("2026-11-21T10:00:00Z 0 [System] [MY-010931] [Server] /usr/sbin/mysqld: ready for connections.")));
        assert!(builtin("oracle")
            .unwrap_err()
            .contains("not a built-in rule set"));
    }
}
