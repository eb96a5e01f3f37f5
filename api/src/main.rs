//! The `tidemark` binary.

use clap::Parser;
use tidemark::cli::args::{Cli, Command};
use tidemark::config::{Config, Overrides};

fn main() {
    tidemark::install_tls_provider();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Serve(args) => {
            // Before any thread allocates: freed record buffers go back to
            // the system instead of piling up in per-thread arenas (see
            // M1). Only the daemon: a client (a restore from the archive)
            // would pay a page fault per page of every large buffer.
            tidemark_journal::return_freed_buffers_to_the_system();
            raise_open_files_limit();
            serve(args)
        }
        command => {
            quiet_on_closed_stdout();
            client(cli.server, cli.token, cli.ca, command)
        }
    };
    std::process::exit(code);
}

/// Every consistency group holds a RocksDB index, segment files, a dirty
/// map and a production file open, so a daemon serving hundreds of volumes
/// needs more than the usual soft limit of 1 024 descriptors: take the hard
/// limit, as databases do.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write `limit`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// A reader that closes the pipe early (`tidemark … | head`, `grep -q`)
/// ends the CLI quietly with status 141, as SIGPIPE ends other tools,
/// instead of a panic message. SIGPIPE itself stays ignored: a peer that
/// closes a network connection must be an error the CLI reports, not a
/// signal that kills it.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.contains("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

fn client(
    server: String,
    token: Option<String>,
    ca: Option<std::path::PathBuf>,
    command: Command,
) -> i32 {
    // `replica add --ca F` names the replica site's CA; this site's own,
    // if it speaks TLS with another, is then in TIDEMARK_CA.
    let this_site_ca = matches!(
        command,
        Command::Replica(tidemark::cli::args::ReplicaCommand::Add { .. })
    )
    .then(|| std::env::var_os("TIDEMARK_CA").filter(|v| !v.is_empty()))
    .flatten()
    .map(std::path::PathBuf::from);
    let connection = tidemark::cli::Connection {
        server,
        token,
        ca,
        this_site_ca,
    };
    match tidemark::cli::run_client(&connection, command) {
        Ok(()) => 0,
        Err(failure) => {
            eprintln!("tidemark: {}", failure.message);
            failure.code
        }
    }
}

fn serve(args: tidemark::cli::args::ServeArgs) -> i32 {
    let overrides = Overrides {
        data_dir: args.data_dir,
        nbd: args.nbd,
        grpc: args.grpc,
        http: args.http,
        token_file: args.token_file,
    };
    let config = match Config::load(args.config.as_deref(), &overrides) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("tidemark: {e}");
            return 2;
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match tidemark::daemon::serve(config) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("tidemark: {e}");
            1
        }
    }
}
