//! Who may use the API (target S7): every gRPC request carries the daemon's
//! token; without it, or with another, the request is refused before it
//! does anything — the requests that run commands, open paths or write
//! files included — and the CLI says so in one sentence, exit status 1.
//! With a certificate configured the API speaks TLS.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use tidemark_proto::v1 as pb;
use tidemark_tests::{binary, Daemon};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn the_token_is_made_private_and_the_cli_uses_it() {
    let d = Daemon::start();
    let token = d.token();
    assert_eq!(token.len(), 64, "256 bits as hex: {token}");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
    let mode = std::fs::metadata(d.token_file())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "api.token is readable by its owner only"
    );

    // TIDEMARK_TOKEN_FILE (the harness), --token and TIDEMARK_TOKEN all work.
    d.ok(&["status"]);
    d.ok(&["--token", &token, "status"]);
    let out = d
        .cli_command(&["status"])
        .env_remove("TIDEMARK_TOKEN_FILE")
        .env("TIDEMARK_TOKEN", &token)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // ./tidemark-data/api.token is the default: run from the data dir's parent.
    let out = d
        .cli_command(&["status"])
        .env_remove("TIDEMARK_TOKEN_FILE")
        .current_dir(d.dir.path())
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the harness's data dir is data/, not tidemark-data/"
    );
    std::fs::create_dir_all(d.path("cwd/tidemark-data")).unwrap();
    std::fs::copy(d.token_file(), d.path("cwd/tidemark-data/api.token")).unwrap();
    let out = d
        .cli_command(&["status"])
        .env_remove("TIDEMARK_TOKEN_FILE")
        .current_dir(d.path("cwd"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The token survives a restart.
    let mut d = d;
    d.restart();
    assert_eq!(d.token(), token);
    d.ok(&["status"]);
}

#[test]
fn requests_without_the_right_token_are_refused_by_the_cli_and_the_api() {
    let d = Daemon::start();
    d.create_volume("db", "4M", "sync");
    d.ok(&["tag", "create", "db", "t"]);

    for (how, extra, want) in [
        ("no token", None, "no API token"),
        ("a wrong token", Some("0123"), "token is wrong"),
    ] {
        let mut command = d.cli_command(&["volume", "list"]);
        command
            .env_remove("TIDEMARK_TOKEN_FILE")
            .current_dir(d.dir.path());
        if let Some(token) = extra {
            command.env("TIDEMARK_TOKEN", token);
        }
        let out = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{how}: {stderr}");
        assert!(stderr.contains(want), "{how}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one sentence: {stderr}");
    }
    let out = d
        .cli_command(&["volume", "list"])
        .env("TIDEMARK_TOKEN_FILE", d.path("missing.token"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("missing.token"), "{stderr}");

    // The requests that act with the daemon's privileges, sent raw.
    let rt = runtime();
    let marker = d.path("ran");
    let backing = d.path("backing.img");
    let restored = d.path("restored.img");
    for token in [None, Some("wrong")] {
        let mut client = rt.block_on(d.grpc_client_with(token));
        let refused = [
            rt.block_on(client.verify_tag(pb::VerifyTagRequest {
                volume: "db".into(),
                name: "t".into(),
                command: format!("touch {}", marker.display()),
            }))
            .map(|_| ()),
            rt.block_on(client.create_volume(pb::CreateVolumeRequest {
                name: "evil".into(),
                size: 1 << 20,
                backing: backing.display().to_string(),
                mode: String::new(),
                group: String::new(),
            }))
            .map(|_| ()),
            rt.block_on(client.restore(pb::RestoreRequest {
                volume: "db".into(),
                at: "latest".into(),
                to: restored.display().to_string(),
            }))
            .map(|_| ()),
            rt.block_on(client.status(pb::StatusRequest {})).map(|_| ()),
        ];
        for outcome in refused {
            let status = outcome.expect_err("refused without the token");
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status}");
        }
    }
    assert!(
        !marker.exists(),
        "a command ran for a caller without the token"
    );
    assert!(
        !backing.exists(),
        "a path was opened for a caller without the token"
    );
    assert!(
        !restored.exists(),
        "a file was written for a caller without the token"
    );
    assert!(!d.ok(&["volume", "list"]).contains("evil"));

    // Metrics and health need no token.
    assert_eq!(d.http_get("/metrics").0, 200);
    assert!(d.healthy());
}

#[test]
fn a_configured_token_file_is_used_and_must_exist() {
    let secret_dir = tempfile::tempdir().unwrap();
    let file = secret_dir.path().join("token");
    std::fs::write(&file, "correct-horse\n").unwrap();
    let d = Daemon::with_config(&format!(
        "{}\n[api]\ntoken_file = {:?}\n",
        tidemark_tests::TEST_CONFIG,
        file.display().to_string()
    ));
    assert!(
        !d.token_file().exists(),
        "no token is made when one is configured"
    );
    d.ok(&["--token", "correct-horse", "status"]);
    let out = d
        .cli_command(&["--token", "battery", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));

    let (code, stderr) = Daemon::refuses_to_start(&format!(
        "[api]\ntoken_file = {:?}\n",
        secret_dir.path().join("absent").display().to_string()
    ));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("absent"), "{stderr}");
}

#[test]
fn with_a_certificate_the_api_speaks_tls() {
    let certs = tempfile::tempdir().unwrap();
    let Some((cert, key)) = tidemark_tests::self_signed_certificate(certs.path()) else {
        return;
    };
    let d = Daemon::with_config(&format!(
        "{}\n[api]\ntls_cert = {:?}\ntls_key = {:?}\n",
        tidemark_tests::TEST_CONFIG,
        cert.display().to_string(),
        key.display().to_string()
    ));
    assert!(d.grpc.starts_with("https://"), "{}", d.grpc);
    // Trusting the certificate: works, with the token.
    let out = d
        .cli_command(&["--ca", &cert.display().to_string(), "volume", "list"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = d
        .cli_command(&["volume", "list"])
        .env("TIDEMARK_CA", &cert)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Not trusting it, or speaking plain HTTP to it: refused, clearly.
    let out = d.cli_command(&["volume", "list"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let plain = d.grpc.replacen("https://", "http://", 1);
    let out = Command::new(binary())
        .args(["--server", &plain, "--token", &d.token(), "volume", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "plain HTTP to a TLS API");
    // TLS does not replace the token.
    let out = d
        .cli_command(&["--ca", &cert.display().to_string(), "volume", "list"])
        .env_remove("TIDEMARK_TOKEN_FILE")
        .current_dir(d.dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no API token"));

    // The HTTP address (console, JSON API, metrics) speaks TLS too, and
    // the session cookie is then marked Secure.
    if tidemark_tests::require("curl", "the console's TLS check") {
        let curl = |args: &[&str]| {
            let out = Command::new("curl")
                .args([
                    "-s",
                    "--max-time",
                    "10",
                    "--cacert",
                    &cert.display().to_string(),
                ])
                .args(args)
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        assert_eq!(curl(&[&format!("https://{}/healthz", d.http)]), "ok\n");
        let headers = curl(&[
            "-D",
            "-",
            "-o",
            "/dev/null",
            &format!("https://{}/?token={}", d.http, d.token()),
        ]);
        assert!(headers.contains("303"), "{headers}");
        assert!(headers.to_ascii_lowercase().contains("secure"), "{headers}");
        let plain = Command::new("curl")
            .args([
                "-s",
                "--max-time",
                "5",
                &format!("http://{}/healthz", d.http),
            ])
            .output()
            .unwrap();
        assert_ne!(
            String::from_utf8_lossy(&plain.stdout),
            "ok\n",
            "plain HTTP to a TLS address"
        );
    }
}
