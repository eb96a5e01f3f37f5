//! Commands and flags, as interface.md gives them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::point_spec::PointSpec;
use crate::size::parse_size;

/// tidemark — continuous data protection for block volumes.
#[derive(Debug, Parser)]
#[command(name = "tidemark", version, about, propagate_version = true)]
pub struct Cli {
    /// Address of the daemon's gRPC API.
    #[arg(
        long,
        global = true,
        env = "TIDEMARK_SERVER",
        default_value = "127.0.0.1:7700"
    )]
    pub server: String,
    /// The daemon's API token (else TIDEMARK_TOKEN_FILE, else
    /// ./tidemark-data/api.token).
    #[arg(long, global = true, env = "TIDEMARK_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) to trust for an https:// --server.
    #[arg(long, global = true, env = "TIDEMARK_CA")]
    pub ca: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// A point, checked when the command line is parsed.
fn point(text: &str) -> Result<String, String> {
    PointSpec::parse(text).map(|_| text.to_string())
}

fn size(text: &str) -> Result<u64, String> {
    parse_size(text)
}

fn mode(text: &str) -> Result<String, String> {
    crate::config::parse_mode(text).map(|m| m.to_string())
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Serve(ServeArgs),
    /// Create, list, inspect, re-mode and delete protected volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Name points on a volume's timeline.
    #[command(subcommand)]
    Tag(TagCommand),
    /// Show a volume's tags, flush points, events and gaps.
    Timeline {
        /// The volume.
        volume: String,
        /// Start at this point (default: the oldest retained).
        #[arg(long, value_parser = point, allow_hyphen_values = true)]
        from: Option<String>,
        /// End at this point (default: latest).
        #[arg(long, value_parser = point, allow_hyphen_values = true)]
        to: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Export a point as an NBD device and print its URI.
    Export {
        /// The volume.
        volume: String,
        /// The point.
        #[arg(long, value_parser = point, allow_hyphen_values = true)]
        at: String,
        /// Accept writes into a throw-away overlay.
        #[arg(long)]
        writable: bool,
    },
    /// Remove an export made with `export`.
    Unexport {
        /// The export's name.
        export: String,
    },
    /// Materialise a point into a file or device on the daemon's host —
    /// or, with --from-archive, here, from the bucket alone (no daemon).
    Restore {
        /// The volume.
        volume: String,
        /// The point.
        #[arg(long, value_parser = point, allow_hyphen_values = true)]
        at: String,
        /// Target file or block device.
        #[arg(long)]
        to: PathBuf,
        /// Restore from this archive (s3://BUCKET/PREFIX), needing no
        /// daemon and no local data.
        #[arg(long = "from-archive")]
        from_archive: Option<String>,
        /// The S3-compatible endpoint of the archive (omit for AWS).
        #[arg(long, requires = "from_archive")]
        endpoint: Option<String>,
        /// The archive's region (default: the AWS chain, else us-east-1).
        #[arg(long, requires = "from_archive")]
        region: Option<String>,
        /// Chunks downloaded at once.
        #[arg(long, default_value_t = 16, requires = "from_archive")]
        parallel: usize,
    },
    /// The archive of the daemon's groups.
    #[command(subcommand)]
    Archive(ArchiveCommand),
    /// Rewind the live volume to a point (journalled, so it can be undone).
    Rollback {
        /// The volume.
        volume: String,
        /// The point.
        #[arg(long, value_parser = point, allow_hyphen_values = true)]
        to: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Show the daemon's role, epoch, volumes and exports.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Replicate volumes to a second site, and see how far behind it is.
    #[command(subcommand)]
    Replica(ReplicaCommand),
    /// Take over as the primary of a volume's group (on the replica site):
    /// the epoch is raised, the live export accepts writes.
    Failover {
        /// A volume of the group (the whole group is promoted).
        volume: String,
        /// The point to promote at (default: as [failover] promote_at says).
        #[arg(long, value_parser = point, allow_hyphen_values = true)]
        at: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Hand a volume's group over to the site it replicates to (on the
    /// primary): writes stop, the replica catches up, the roles flip.
    Failback {
        /// A volume of the group.
        volume: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `tidemark archive …`.
#[derive(Debug, Subcommand)]
pub enum ArchiveCommand {
    /// Where each group's archive stands: archived up to which seq and
    /// time, lag, bytes, objects, the last error.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `tidemark replica …` (on the primary site).
#[derive(Debug, Subcommand)]
pub enum ReplicaCommand {
    /// Replicate a volume (its whole consistency group) to the daemon at
    /// ADDR. `--ca F` (the global flag) is the replica site's CA here;
    /// this site's own, if it speaks TLS, is then in TIDEMARK_CA.
    Add {
        /// The volume.
        volume: String,
        /// The replica site's daemon: HOST:PORT, or https://HOST:PORT.
        #[arg(long = "to")]
        to: String,
        /// sync (RPO 0), async or adaptive.
        #[arg(long, default_value = "async", value_parser = replica_mode)]
        mode: String,
        /// File holding the replica site's API token.
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// Every replica: state, mode, lag and RPO.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop replicating a volume's group.
    Remove {
        /// The volume.
        volume: String,
    },
    /// Compare one point's content on both sites: equal, or the regions
    /// that differ.
    Verify {
        /// The volume.
        volume: String,
        /// The point (default: the newest the replica holds).
        #[arg(long, value_parser = point, allow_hyphen_values = true)]
        at: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn replica_mode(text: &str) -> Result<String, String> {
    match text {
        "sync" | "async" | "adaptive" => Ok(text.to_string()),
        other => Err(format!(
            "replication mode {other:?} must be sync, async or adaptive"
        )),
    }
}

/// `tidemark serve` flags.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Data directory (default ./tidemark-data).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// NBD listen address (default 127.0.0.1:10809).
    #[arg(long)]
    pub nbd: Option<String>,
    /// gRPC listen address (default 127.0.0.1:7700).
    #[arg(long)]
    pub grpc: Option<String>,
    /// HTTP listen address (default 127.0.0.1:7701).
    #[arg(long)]
    pub http: Option<String>,
    /// File holding the API token (default DATA_DIR/api.token, made at the
    /// first start).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

/// `tidemark volume …`.
#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create and protect a volume.
    Create {
        /// Its name (letters, digits, '-', '_', '.').
        name: String,
        /// Its size: 512, 64K, 10G, 1T (powers of 1024).
        #[arg(long, value_parser = size)]
        size: u64,
        /// The production volume (file or block device); default: a
        /// sparse file in the data directory.
        #[arg(long)]
        backing: Option<PathBuf>,
        /// IO mode.
        #[arg(long, value_parser = mode)]
        mode: Option<String>,
        /// Consistency group (default: its own).
        #[arg(long)]
        group: Option<String>,
    },
    /// List volumes.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one volume: mode, cache use, newest seq, horizon.
    Show {
        /// The volume.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change a volume's IO mode.
    SetMode {
        /// The volume.
        name: String,
        /// sync, async or adaptive.
        #[arg(value_parser = mode)]
        mode: String,
    },
    /// Stop protecting a volume and delete its journal.
    Delete {
        /// The volume.
        name: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

/// `tidemark tag …`.
#[derive(Debug, Subcommand)]
pub enum TagCommand {
    /// Tag the current point (after a flush).
    Create {
        /// The volume.
        volume: String,
        /// The tag's name, unique per volume.
        name: String,
        /// A note.
        #[arg(long)]
        note: Option<String>,
        /// Freeze the application first, thaw after (needs a
        /// [[tagging.hook]] for the volume or its group).
        #[arg(long)]
        app_consistent: bool,
    },
    /// List a volume's tags.
    List {
        /// The volume.
        volume: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a tag.
    Delete {
        /// The volume.
        volume: String,
        /// The tag.
        name: String,
    },
    /// Check a tag's point (e2fsck -fn, or CMD with the point's NBD URI in
    /// $TIDEMARK_URI) and record the result on the tag.
    Verify {
        /// The volume.
        volume: String,
        /// The tag.
        name: String,
        /// The check to run instead of e2fsck.
        #[arg(long)]
        command: Option<String>,
    },
}
