//! Client commands: each is one gRPC call (or stream) to the daemon.

use std::io::{IsTerminal, Write};

use serde_json::json;
use tidemark_proto::v1 as pb;
use tidemark_proto::v1::tidemark_client::TidemarkClient;
use tidemark_replicator::link::error_chain;
use tonic::transport::Channel;

use super::args::{ArchiveCommand, Command, ReplicaCommand, TagCommand, VolumeCommand};
use super::output::{self, replica_json, tag_json, timeline_json, volume_json};
use crate::size::format_size;

/// How a client command failed: exit status 1 (the operation failed) or
/// 2 (bad usage), with one sentence for stderr.
#[derive(Debug)]
pub struct Failure {
    /// Exit status.
    pub code: i32,
    /// What was wrong.
    pub message: String,
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Self {
        Failure {
            code: 1,
            message: status.message().to_string(),
        }
    }
}

pub(super) fn usage(message: String) -> Failure {
    Failure { code: 2, message }
}

pub(super) fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

/// Asks on the terminal; without one, `--yes` is required.
fn confirm(question: &str, what: &str) -> Result<(), Failure> {
    if !std::io::stdin().is_terminal() {
        return Err(usage(format!(
            "refusing to {what} without --yes (no terminal to ask on)"
        )));
    }
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    let _ = std::io::stdin().read_line(&mut answer);
    if matches!(answer.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        Err(Failure {
            code: 1,
            message: format!("did not {what}"),
        })
    }
}

/// How the CLI reaches the daemon.
#[derive(Debug, Clone)]
pub struct Connection {
    /// `--server`: `HOST:PORT`, `http://HOST:PORT` or `https://HOST:PORT`.
    pub server: String,
    /// `--token` / `TIDEMARK_TOKEN`.
    pub token: Option<String>,
    /// `--ca` / `TIDEMARK_CA`: the CA to trust for `https://`.
    pub ca: Option<std::path::PathBuf>,
    /// `replica add` only: `TIDEMARK_CA`, this site's CA, trusted beside
    /// `--ca` (the replica site's).
    pub this_site_ca: Option<std::path::PathBuf>,
}

impl Connection {
    /// The CAs to trust: `--ca`, and for `replica add` (whose `--ca` names
    /// the replica site's CA) this site's as well.
    fn cas(&self) -> Vec<std::path::PathBuf> {
        let mut cas: Vec<std::path::PathBuf> = self.ca.iter().cloned().collect();
        if let Some(own) = &self.this_site_ca {
            if !cas.contains(own) {
                cas.push(own.clone());
            }
        }
        cas
    }

    /// The token to present: `--token` / `TIDEMARK_TOKEN`, else the file
    /// `TIDEMARK_TOKEN_FILE` names, else `./tidemark-data/api.token` if it
    /// exists; `None` sends none (and the daemon says so).
    fn token(&self) -> Result<Option<String>, Failure> {
        if let Some(token) = self.token.as_deref().filter(|t| !t.is_empty()) {
            return Ok(Some(token.trim().to_string()));
        }
        let (path, required) = match std::env::var_os("TIDEMARK_TOKEN_FILE") {
            Some(path) => (std::path::PathBuf::from(path), true),
            None => (std::path::PathBuf::from("./tidemark-data/api.token"), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text.trim().to_string())),
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Failure {
                code: 1,
                message: format!(
                    "cannot read the API token from {} (TIDEMARK_TOKEN_FILE): {e}",
                    path.display()
                ),
            }),
        }
    }
}

/// Adds the daemon's token to every request.
#[derive(Clone, Debug)]
pub struct Bearer(pub Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A client of the daemon's API.
pub type Client = TidemarkClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

async fn connect(connection: &Connection) -> Result<Client, Failure> {
    let server = &connection.server;
    let uri = if server.contains("://") {
        server.to_string()
    } else {
        format!("http://{server}")
    };
    let mut endpoint = Channel::from_shared(uri.clone())
        .map_err(|e| usage(format!("--server {server:?} is not an address: {e}")))?
        .connect_timeout(std::time::Duration::from_secs(5));
    if uri.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new();
        for ca in connection.cas() {
            let pem = std::fs::read(&ca).map_err(|e| Failure {
                code: 1,
                message: format!("cannot read the CA certificate {}: {e}", ca.display()),
            })?;
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| Failure {
            code: 1,
            message: format!("cannot set up TLS for {server}: {}", error_chain(&e)),
        })?;
    }
    let token = match connection.token()? {
        Some(token) => Some(format!("Bearer {token}").parse().map_err(|_| Failure {
            code: 2,
            message: "the API token holds characters a request header cannot carry".into(),
        })?),
        None => None,
    };
    let channel = endpoint.connect().await.map_err(|e| Failure {
        code: 1,
        message: format!(
            "cannot reach the tidemark daemon at {server} ({}); is `tidemark serve` running?",
            error_chain(&e)
        ),
    })?;
    Ok(TidemarkClient::with_interceptor(channel, Bearer(token))
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

/// Runs one client command against the daemon `connection` names.
pub fn run_client(connection: &Connection, command: Command) -> Result<(), Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure {
            code: 1,
            message: format!("cannot start the runtime: {e}"),
        })?;
    if let Command::Restore {
        volume,
        at,
        to,
        from_archive: Some(url),
        endpoint,
        region,
        parallel,
    } = command
    {
        // From the bucket alone: no daemon to connect to.
        return super::archive::restore(super::archive::FromArchive {
            volume,
            at,
            to,
            url,
            endpoint,
            region,
            parallel,
        });
    }
    runtime.block_on(async move {
        let mut client = connect(connection).await?;
        run(&mut client, command).await
    })
}

async fn run(client: &mut Client, command: Command) -> Result<(), Failure> {
    match command {
        Command::Serve(_) => unreachable!("serve is not a client command"),
        Command::Volume(v) => volume(client, v).await,
        Command::Tag(t) => tag(client, t).await,
        Command::Timeline {
            volume,
            from,
            to,
            json,
        } => {
            let t = client
                .timeline(pb::TimelineRequest {
                    volume,
                    from: from.unwrap_or_default(),
                    to: to.unwrap_or_default(),
                })
                .await?
                .into_inner();
            if json {
                print_json(&timeline_json(&t));
            } else {
                println!(
                    "volume {}: history seq {}..={}",
                    t.volume, t.horizon_seq, t.newest_seq
                );
                let rows: Vec<Vec<String>> = t
                    .entries
                    .iter()
                    .map(|e| {
                        let seq = if e.count > 1 && e.kind == "flush" {
                            format!("{}..{}", e.first_seq, e.seq)
                        } else {
                            e.seq.to_string()
                        };
                        vec![
                            seq,
                            e.time.clone(),
                            e.kind.clone(),
                            e.name.clone(),
                            e.detail.clone(),
                        ]
                    })
                    .collect();
                output::table(&["SEQ", "TIME", "KIND", "NAME", "DETAIL"], &rows);
            }
            Ok(())
        }
        Command::Export {
            volume,
            at,
            writable,
        } => {
            let e = client
                .export(pb::ExportRequest {
                    volume,
                    at,
                    writable,
                })
                .await?
                .into_inner();
            println!("{}", e.uri);
            Ok(())
        }
        Command::Unexport { export } => {
            client
                .unexport(pb::UnexportRequest {
                    name: export.clone(),
                })
                .await?;
            println!("unexported {export}");
            Ok(())
        }
        Command::Restore { volume, at, to, .. } => restore(client, volume, at, to).await,
        Command::Archive(ArchiveCommand::Status { json }) => {
            let s = client
                .archive_status(pb::ArchiveStatusRequest {})
                .await?
                .into_inner();
            super::archive::print_status(&s, json);
            Ok(())
        }
        Command::Rollback { volume, to, yes } => {
            if !yes {
                confirm(
                    &format!("Roll volume {volume} back to {to}? Its live contents change (the rollback can be undone)."),
                    &format!("roll back volume {volume}"),
                )?;
            }
            let r = client
                .rollback(pb::RollbackRequest {
                    volume: volume.clone(),
                    to,
                })
                .await?
                .into_inner();
            println!(
                "rolled volume {volume} back to seq {}: {} rewritten; undo with: tidemark rollback {volume} --to {}",
                r.to_seq,
                format_size(r.bytes),
                r.undo_seq
            );
            Ok(())
        }
        Command::Replica(command) => replica(client, command).await,
        Command::Failover { volume, at, json } => {
            let p = client
                .failover(pb::FailoverRequest {
                    volume,
                    at: at.unwrap_or_default(),
                    reason: String::new(),
                })
                .await?
                .into_inner();
            print_promotion(&p, json, "is the primary here now");
            Ok(())
        }
        Command::Failback { volume, json } => {
            let p = client
                .failback(pb::FailbackRequest { volume })
                .await?
                .into_inner();
            print_promotion(
                &p,
                json,
                "is the other site's now; this site is its replica",
            );
            Ok(())
        }
        Command::Status { json } => {
            let s = client.status(pb::StatusRequest {}).await?.into_inner();
            if json {
                print_json(&json!({
                    "volumes": s.volumes.iter().map(volume_json).collect::<Vec<_>>(),
                    "role": s.role,
                    "epoch": s.epoch,
                    "version": s.version,
                    "nbd": s.nbd,
                    "data_dir": s.data_dir,
                    "exports": s.exports.iter().map(|e| json!({"name": e.name, "uri": e.uri, "seq": e.seq, "writable": e.writable})).collect::<Vec<_>>(),
                    "failover": s.failover.as_ref().map(output::failover_json),
                }));
            } else {
                println!(
                    "tidemark {}: role {}, epoch {}, NBD on {}, data in {}",
                    s.version, s.role, s.epoch, s.nbd, s.data_dir
                );
                output::volumes_table(&s.volumes);
                for e in &s.exports {
                    println!(
                        "export {} (seq {}{}): {}",
                        e.name,
                        e.seq,
                        if e.writable { ", writable" } else { "" },
                        e.uri
                    );
                }
            }
            Ok(())
        }
    }
}

fn print_promotion(p: &pb::FailoverResponse, json: bool, what: &str) {
    if json {
        print_json(&json!({
            "group": p.group,
            "epoch": p.epoch,
            "seq": p.seq,
            "point": p.point,
            "volumes": p.volumes,
        }));
    } else {
        println!(
            "group {} {what}: epoch {}, at seq {} ({}); volumes {}",
            p.group,
            p.epoch,
            p.seq,
            p.point,
            p.volumes.join(", ")
        );
    }
}

async fn volume(client: &mut Client, command: VolumeCommand) -> Result<(), Failure> {
    match command {
        VolumeCommand::Create {
            name,
            size,
            backing,
            mode,
            group,
        } => {
            let backing = match backing {
                Some(path) => std::path::absolute(&path)
                    .map_err(|e| usage(format!("--backing {}: {e}", path.display())))?
                    .display()
                    .to_string(),
                None => String::new(),
            };
            let v = client
                .create_volume(pb::CreateVolumeRequest {
                    name,
                    size,
                    backing,
                    mode: mode.unwrap_or_default(),
                    group: group.unwrap_or_default(),
                })
                .await?
                .into_inner();
            println!(
                "created volume {} ({}, {} mode, group {})",
                v.name,
                format_size(v.size),
                v.mode,
                v.group
            );
            Ok(())
        }
        VolumeCommand::List { json } => {
            let list = client
                .list_volumes(pb::ListVolumesRequest {})
                .await?
                .into_inner();
            if json {
                print_json(&serde_json::Value::Array(
                    list.volumes.iter().map(volume_json).collect(),
                ));
            } else {
                output::volumes_table(&list.volumes);
            }
            Ok(())
        }
        VolumeCommand::Show { name, json } => {
            let d = client
                .show_volume(pb::VolumeRef { name })
                .await?
                .into_inner();
            let v = d.volume.unwrap_or_default();
            let cache = d.cache.unwrap_or_default();
            let stats = d.stats.unwrap_or_default();
            if json {
                let mut value = volume_json(&v);
                value["cache"] = json!({
                    "memory_bytes": cache.memory_bytes,
                    "file_bytes": cache.file_bytes,
                    "memory_limit": cache.memory_limit,
                    "file_limit": cache.file_limit,
                });
                value["stats"] = json!({
                    "writes": stats.writes,
                    "bytes": stats.bytes,
                    "sync_writes": stats.sync_writes,
                    "async_writes": stats.async_writes,
                    "mode_switches": stats.mode_switches,
                    "resynced_regions": stats.resynced_regions,
                    "dirty_regions": stats.dirty_regions,
                    "cache_fallbacks": stats.cache_fallbacks,
                });
                value["journal_bytes"] = json!(d.journal_bytes);
                value["nbd_clients"] = json!(d.nbd_clients);
                value["tags"] = json!(d.tags);
                if let Some(f) = &d.failover {
                    value["failover"] = output::failover_json(f);
                }
                if let Some(first) = d.replicas.first() {
                    value["replica"] = replica_json(first);
                    value["replicas"] =
                        json!(d.replicas.iter().map(replica_json).collect::<Vec<_>>());
                }
                print_json(&value);
            } else {
                println!("volume      {}", v.name);
                println!("size        {}", format_size(v.size));
                println!(
                    "mode        {} (writes go {} now)",
                    v.mode, v.effective_mode
                );
                println!("group       {}", v.group);
                println!("backing     {}", v.backing);
                println!("newest      seq {} at {}", v.newest_seq, v.newest_time);
                println!("horizon     seq {} at {}", v.horizon_seq, v.horizon_time);
                println!("journal     {}", format_size(d.journal_bytes));
                println!(
                    "cache       memory {} of {}, file {} of {}",
                    format_size(cache.memory_bytes),
                    format_size(cache.memory_limit),
                    format_size(cache.file_bytes),
                    format_size(cache.file_limit)
                );
                println!(
                    "writes      {} ({}; {} sync, {} async), {} mode switches, {} regions resynced",
                    stats.writes,
                    format_size(stats.bytes),
                    stats.sync_writes,
                    stats.async_writes,
                    stats.mode_switches,
                    stats.resynced_regions
                );
                println!("clients     {}", d.nbd_clients);
                println!("tags        {}", d.tags);
                println!("role        {} (epoch {})", v.role, v.epoch);
                for r in &d.replicas {
                    println!(
                        "replica     {}: {}, {} mode (now {}), acked seq {}, lag {:.3} s, RPO {:.3} s{}",
                        r.address,
                        r.state,
                        r.mode,
                        r.effective_mode,
                        r.acked_seq,
                        r.lag_seconds,
                        r.rpo_seconds,
                        if r.last_error.is_empty() {
                            String::new()
                        } else {
                            format!(" (last error: {})", r.last_error)
                        }
                    );
                }
            }
            Ok(())
        }
        VolumeCommand::SetMode { name, mode } => {
            let v = client
                .set_mode(pb::SetModeRequest { name, mode })
                .await?
                .into_inner();
            println!("volume {} is now in {} mode", v.name, v.mode);
            Ok(())
        }
        VolumeCommand::Delete { name, yes } => {
            if !yes {
                confirm(
                    &format!("Delete volume {name} and its whole history?"),
                    &format!("delete volume {name}"),
                )?;
            }
            client
                .delete_volume(pb::VolumeRef { name: name.clone() })
                .await?;
            println!("deleted volume {name}");
            Ok(())
        }
    }
}

async fn tag(client: &mut Client, command: TagCommand) -> Result<(), Failure> {
    match command {
        TagCommand::Create {
            volume,
            name,
            note,
            app_consistent,
        } => {
            let t = client
                .create_tag(pb::CreateTagRequest {
                    volume: volume.clone(),
                    name,
                    note: note.unwrap_or_default(),
                    app_consistent,
                })
                .await?
                .into_inner();
            println!(
                "tagged volume {volume} at seq {} as {} ({} consistent)",
                t.seq, t.name, t.consistency
            );
            Ok(())
        }
        TagCommand::List { volume, json } => {
            let list = client
                .list_tags(pb::VolumeRef { name: volume })
                .await?
                .into_inner();
            if json {
                print_json(&serde_json::Value::Array(
                    list.tags.iter().map(tag_json).collect(),
                ));
            } else {
                let rows: Vec<Vec<String>> = list
                    .tags
                    .iter()
                    .map(|t| {
                        vec![
                            t.name.clone(),
                            t.seq.to_string(),
                            t.time.clone(),
                            t.source.clone(),
                            t.consistency.clone(),
                            t.verified.clone(),
                            t.note.clone(),
                        ]
                    })
                    .collect();
                output::table(
                    &[
                        "NAME",
                        "SEQ",
                        "TIME",
                        "SOURCE",
                        "CONSISTENCY",
                        "VERIFIED",
                        "NOTE",
                    ],
                    &rows,
                );
            }
            Ok(())
        }
        TagCommand::Verify {
            volume,
            name,
            command,
        } => {
            let t = client
                .verify_tag(pb::VerifyTagRequest {
                    volume: volume.clone(),
                    name,
                    command: command.unwrap_or_default(),
                })
                .await?
                .into_inner();
            println!(
                "tag {} of volume {volume} (seq {}): verification {} ({})",
                t.name, t.seq, t.verified, t.verified_by
            );
            if !t.verification_detail.is_empty() {
                println!("{}", t.verification_detail);
            }
            if t.verified == "passed" {
                Ok(())
            } else {
                Err(Failure {
                    code: 1,
                    message: format!("the point of tag {} failed its check", t.name),
                })
            }
        }
        TagCommand::Delete { volume, name } => {
            client
                .delete_tag(pb::DeleteTagRequest {
                    volume: volume.clone(),
                    name: name.clone(),
                })
                .await?;
            println!("deleted tag {name} of volume {volume}");
            Ok(())
        }
    }
}

/// A progress bar of bytes on the terminal.
pub(super) fn progress_bar(total: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

async fn restore(
    client: &mut Client,
    volume: String,
    at: String,
    to: std::path::PathBuf,
) -> Result<(), Failure> {
    let target =
        std::path::absolute(&to).map_err(|e| usage(format!("--to {}: {e}", to.display())))?;
    let mut stream = client
        .restore(pb::RestoreRequest {
            volume: volume.clone(),
            at,
            to: target.display().to_string(),
        })
        .await?
        .into_inner();
    let terminal = std::io::stderr().is_terminal();
    let mut bar: Option<indicatif::ProgressBar> = None;
    while let Some(progress) = stream.message().await? {
        if progress.done {
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            println!(
                "restored volume {volume} at seq {} to {} ({})",
                progress.seq,
                target.display(),
                format_size(progress.total_bytes)
            );
            return Ok(());
        }
        if terminal {
            let bar = bar.get_or_insert_with(|| progress_bar(progress.total_bytes));
            bar.set_position(progress.done_bytes);
        } else {
            eprintln!(
                "restoring: {} of {} ({}%)",
                format_size(progress.done_bytes),
                format_size(progress.total_bytes),
                progress.done_bytes * 100 / progress.total_bytes.max(1)
            );
        }
    }
    Err(Failure {
        code: 1,
        message: format!("restore of volume {volume} ended without completing"),
    })
}

/// `tidemark replica …`.
async fn replica(client: &mut Client, command: ReplicaCommand) -> Result<(), Failure> {
    match command {
        ReplicaCommand::Add {
            volume,
            to,
            mode,
            token_file,
        } => {
            let Some(token_file) = token_file else {
                return Err(usage(format!(
                    "replica add needs the token of the daemon at {to}: --token-file F (its DATA_DIR/api.token)"
                )));
            };
            let token = std::fs::read_to_string(&token_file).map_err(|e| Failure {
                code: 1,
                message: format!(
                    "cannot read the replica site's token from {}: {e}",
                    token_file.display()
                ),
            })?;
            let ca_pem = match replica_ca() {
                Some(path) => std::fs::read_to_string(&path).map_err(|e| Failure {
                    code: 1,
                    message: format!(
                        "cannot read the replica site's CA certificate {}: {e}",
                        path.display()
                    ),
                })?,
                None => String::new(),
            };
            let r = client
                .add_replica(pb::AddReplicaRequest {
                    volume,
                    address: to,
                    mode,
                    token: token.trim().to_string(),
                    ca_pem,
                    demotion: String::new(),
                })
                .await?
                .into_inner();
            println!(
                "group {} of volume {} replicates to {} in {} mode ({})",
                r.group, r.volume, r.address, r.mode, r.state
            );
            Ok(())
        }
        ReplicaCommand::List { json } => {
            let list = client
                .list_replicas(pb::ListReplicasRequest {})
                .await?
                .into_inner();
            if json {
                print_json(&serde_json::Value::Array(
                    list.replicas.iter().map(replica_json).collect(),
                ));
            } else {
                let rows: Vec<Vec<String>> = list
                    .replicas
                    .iter()
                    .map(|r| {
                        vec![
                            r.volume.clone(),
                            r.address.clone(),
                            r.state.clone(),
                            format!("{} (now {})", r.mode, r.effective_mode),
                            r.acked_seq.to_string(),
                            format!("{:.3}", r.lag_seconds),
                            format!("{:.3}", r.rpo_seconds),
                            format_size(r.lag_bytes),
                            r.last_error.clone(),
                        ]
                    })
                    .collect();
                output::table(
                    &[
                        "VOLUME",
                        "REPLICA",
                        "STATE",
                        "MODE",
                        "ACKED",
                        "LAG_S",
                        "RPO_S",
                        "LAG",
                        "LAST_ERROR",
                    ],
                    &rows,
                );
            }
            Ok(())
        }
        ReplicaCommand::Remove { volume } => {
            client
                .remove_replica(pb::VolumeRef {
                    name: volume.clone(),
                })
                .await?;
            println!("volume {volume} no longer replicates");
            Ok(())
        }
        ReplicaCommand::Verify { volume, at, json } => {
            let v = client
                .verify_replica(pb::VerifyReplicaRequest {
                    volume: volume.clone(),
                    at: at.unwrap_or_default(),
                })
                .await?
                .into_inner();
            if json {
                print_json(&json!({
                    "volume": volume,
                    "seq": v.seq,
                    "equal": v.equal,
                    "hash": v.hash,
                    "regions": v.regions,
                    "differences": v.differences.iter().map(|d| json!({
                        "volume": d.volume, "offset": d.offset, "length": d.length,
                    })).collect::<Vec<_>>(),
                }));
            } else if v.equal {
                println!(
                    "volume {volume} at seq {}: both sites equal ({} regions, hash {})",
                    v.seq, v.regions, v.hash
                );
            } else {
                println!(
                    "volume {volume} at seq {}: {} of {} regions differ:",
                    v.seq,
                    v.differences.len(),
                    v.regions
                );
                for d in &v.differences {
                    println!("  {} offset {} length {}", d.volume, d.offset, d.length);
                }
            }
            if v.equal {
                Ok(())
            } else {
                Err(Failure {
                    code: 1,
                    message: format!("volume {volume} differs between the sites at seq {}", v.seq),
                })
            }
        }
    }
}

/// `replica add`'s `--ca`, given on its command line (the global flag,
/// which there names the replica site's CA).
fn replica_ca() -> Option<std::path::PathBuf> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--ca")
        .and_then(|i| args.get(i + 1))
        .map(std::path::PathBuf::from)
        .or_else(|| {
            args.iter()
                .find_map(|a| a.strip_prefix("--ca="))
                .map(std::path::PathBuf::from)
        })
}
