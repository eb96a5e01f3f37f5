//! The web console against a real daemon: its JSON API (status codes, bad
//! input, no token, cross-site requests), and the page itself in a real
//! headless Chromium — log in, see a volume with writes and tags, pick a
//! tag on the timeline, export it and read the URI, roll back with
//! confirmation and see the rollback on the timeline, and watch the page
//! follow a tag made from the CLI without a reload.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use fantoccini::actions::{Actions, InputSource, MouseActions, PointerAction, MOUSE_BUTTON_LEFT};
use fantoccini::Locator;
use tidemark_tests::browser::{ensure, step, Browser, Step};
use tidemark_tests::{nbd_to_file, run, Daemon};

/// Where failed scenarios leave screenshots: cargo's scratch directory
/// for this test target.
fn output() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console")
}

/// A daemon with volume `db` holding `first` (1 MiB), tagged `good`, and
/// then `second` over it.
fn daemon_with_history() -> (Daemon, Vec<u8>, Vec<u8>) {
    let d = Daemon::start();
    d.create_volume("db", "16M", "sync");
    let first = vec![0xA1u8; 1 << 20];
    let second = vec![0xB2u8; 1 << 20];
    let file = d.path("first.bin");
    std::fs::write(&file, &first).unwrap();
    run("nbdcopy", &[&file.display().to_string(), &d.uri("db")]);
    d.ok(&["tag", "create", "db", "good"]);
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::write(&file, &second).unwrap();
    run("nbdcopy", &[&file.display().to_string(), &d.uri("db")]);
    (d, first, second)
}

fn head_of(d: &Daemon, uri: &str, len: usize) -> Vec<u8> {
    let out = d.path(&format!("read-{}.img", rand::random::<u32>()));
    nbd_to_file(uri, &out);
    let mut bytes = std::fs::read(&out).unwrap();
    bytes.truncate(len);
    bytes
}

#[test]
fn the_json_api_needs_the_token_and_says_what_is_wrong() {
    let (d, first, _) = daemon_with_history();
    let token = d.token();
    let bearer = format!("Bearer {token}");
    let auth = [("Authorization", bearer.as_str())];

    // /metrics and /healthz stay open; the API does not.
    assert_eq!(d.http("GET", "/healthz", &[], "").status, 200);
    assert_eq!(d.http("GET", "/metrics", &[], "").status, 200);
    let none = d.http("GET", "/api/v1/volumes", &[], "");
    assert_eq!(none.status, 401, "{}", none.body);
    assert!(none.json()["error"].as_str().unwrap().contains("log in"));
    let wrong = d.http(
        "GET",
        "/api/v1/volumes",
        &[("Authorization", "Bearer nope")],
        "",
    );
    assert_eq!(wrong.status, 401);
    assert!(wrong.json()["error"].as_str().unwrap().contains("wrong"));

    // With the token: the gRPC operations as JSON.
    let volumes = d.http("GET", "/api/v1/volumes", &auth, "").json();
    assert_eq!(volumes["volumes"][0]["name"], "db");
    assert!(volumes["volumes"][0]["newest_seq"].as_u64().unwrap() > 0);
    let missing = d.http("GET", "/api/v1/volumes/nope", &auth, "");
    assert_eq!(missing.status, 404, "{}", missing.body);
    assert!(missing.body.contains("nope"), "{}", missing.body);
    let route = d.http("GET", "/api/v1/nothing", &auth, "");
    assert_eq!(route.status, 404);
    assert!(route.body.contains("/api/v1/nothing"));

    // Bad input names what is wrong.
    let typo = d.http("POST", "/api/v1/volumes/db/tags", &auth, r#"{"nam": "x"}"#);
    assert_eq!(typo.status, 400, "{}", typo.body);
    assert!(typo.body.contains("nam"), "{}", typo.body);
    let not_json = d.http("POST", "/api/v1/volumes/db/tags", &auth, "{");
    assert_eq!(not_json.status, 400);
    let bad_point = d.http("GET", "/api/v1/volumes/db/point?at=yesterday", &auth, "");
    assert_eq!(bad_point.status, 400);
    assert!(bad_point.body.contains("yesterday"), "{}", bad_point.body);
    let unconfirmed = d.http(
        "POST",
        "/api/v1/volumes/db/rollback",
        &auth,
        r#"{"to": "tag:good"}"#,
    );
    assert_eq!(unconfirmed.status, 400);
    assert!(
        unconfirmed.body.contains("db@tag:good"),
        "{}",
        unconfirmed.body
    );

    // A tag, the point near it, and the write rate along the timeline.
    let tag = d.http(
        "POST",
        "/api/v1/volumes/db/tags",
        &auth,
        r#"{"name": "api-tag", "note": "from the API"}"#,
    );
    assert_eq!(tag.status, 200, "{}", tag.body);
    let point = d
        .http("GET", "/api/v1/volumes/db/point?at=tag:good", &auth, "")
        .json();
    assert!(point["seq"].as_u64().unwrap() > 0, "{point}");
    let activity = d
        .http("GET", "/api/v1/volumes/db/activity?buckets=10", &auth, "")
        .json();
    let records: u64 = activity["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["records"].as_u64().unwrap())
        .sum();
    assert!(records > 0, "the writes show in the activity: {activity}");
    let timeline = d
        .http("GET", "/api/v1/volumes/db/timeline", &auth, "")
        .json();
    assert!(timeline["entries"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["kind"] == "tag" && e["name"] == "api-tag"));

    // A restore runs as a job whose progress the API reports.
    let target = d.path("restored.img");
    let body = format!(
        r#"{{"at": "tag:good", "to": "{}", "confirm": "db@tag:good"}}"#,
        target.display()
    );
    let job = d.http("POST", "/api/v1/volumes/db/restore", &auth, &body);
    assert_eq!(job.status, 200, "{}", job.body);
    let id = job.json()["id"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let jobs = d.http("GET", "/api/v1/jobs", &auth, "").json();
        let job = jobs
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"] == id)
            .unwrap()
            .clone();
        if job["state"] == "done" {
            assert_eq!(job["done_bytes"], 16 << 20);
            break;
        }
        assert_ne!(job["state"], "failed", "{job}");
        assert!(Instant::now() < deadline, "the restore never finished");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(std::fs::read(&target).unwrap()[..first.len()], first[..]);

    // The login form and /?token= set a cookie scripts cannot read.
    let refused = d.http(
        "POST",
        "/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        "token=nope",
    );
    assert_eq!(refused.status, 401);
    assert!(refused.body.contains("not the daemon"));
    let login = d.http(
        "POST",
        "/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        &format!("token={token}"),
    );
    assert_eq!(login.status, 303, "{}", login.body);
    let set_cookie = login.header("set-cookie").unwrap().to_string();
    assert!(set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"));
    let cookie = set_cookie.split(';').next().unwrap().to_string();
    let by_url = d.http("GET", &format!("/?token={token}"), &[], "");
    assert_eq!(by_url.status, 303);
    assert_eq!(by_url.header("location"), Some("/"));
    assert!(by_url.header("set-cookie").is_some());
    let page = d.http("GET", "/", &[("Cookie", &cookie)], "");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("/assets/console.js"));
    assert_eq!(page.header("x-frame-options"), Some("DENY"));
    let login_page = d.http("GET", "/", &[], "");
    assert!(login_page.body.contains("name=\"token\""));

    // With the cookie, a change needs the session's CSRF secret and this
    // origin.
    let session = d
        .http("GET", "/api/v1/session", &[("Cookie", &cookie)], "")
        .json();
    let csrf = session["csrf"].as_str().unwrap().to_string();
    let body = r#"{"name": "cookie-tag"}"#;
    let forged = d.http(
        "POST",
        "/api/v1/volumes/db/tags",
        &[("Cookie", &cookie)],
        body,
    );
    assert_eq!(forged.status, 403, "{}", forged.body);
    let origin = format!("http://{}", d.http);
    let elsewhere = d.http(
        "POST",
        "/api/v1/volumes/db/tags",
        &[
            ("Cookie", &cookie),
            ("X-CSRF-Token", &csrf),
            ("Origin", "http://evil.example"),
        ],
        body,
    );
    assert_eq!(elsewhere.status, 403);
    let ok = d.http(
        "POST",
        "/api/v1/volumes/db/tags",
        &[
            ("Cookie", &cookie),
            ("X-CSRF-Token", &csrf),
            ("Origin", &origin),
        ],
        body,
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert!(d.tags("db").iter().any(|t| t["name"] == "cookie-tag"));

    // Logging out ends the session.
    d.http(
        "POST",
        "/logout",
        &[("Cookie", &cookie), ("Origin", &origin)],
        "",
    );
    assert_eq!(
        d.http("GET", "/api/v1/volumes", &[("Cookie", &cookie)], "")
            .status,
        401
    );
    assert!(d.healthy(), "the daemon keeps serving");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_user_logs_in_with_the_token_and_not_with_a_wrong_one() {
    let d = Daemon::start();
    d.create_volume("db", "16M", "sync");
    runtime().block_on(async {
        let Some(b) = Browser::start("login", 1280, 800, output()).await else {
            return;
        };
        let scenario = async {
            step("open", b.client.goto(&format!("http://{}/", d.http)).await)?;
            b.type_into("#token", "not-the-token").await?;
            b.click("button[type=submit]").await?;
            // WebDriver gives a hidden element's text as empty: this waits
            // for the answer page, where the line shows.
            b.wait_for_text("#login-error", 10, "the wrong-token line", |t| {
                t.contains("not the daemon's token")
            })
            .await?;
            b.type_into("#token", &d.token()).await?;
            b.click("button[type=submit]").await?;
            b.wait_for_text("#volumes tbody", 15, "volume db", |t| t.contains("db"))
                .await?;
            Ok(())
        };
        let result = scenario.await;
        b.finish(result).await;
    });
}

/// Opens the URL the quick start prints, which logs in, and waits for
/// volume db's tag `good` in the list.
async fn open_console(b: &Browser, d: &Daemon) -> Step {
    let url = format!("http://{}/?token={}", d.http, d.token());
    step("open", b.client.goto(&url).await)?;
    b.wait_for("#mark-list li[data-name=good]", 15).await?;
    Ok(())
}

/// Clicks the mark `name` where the timeline draws it.
async fn click_mark(b: &Browser, name: &str) -> Step {
    let over = b.wait_for("#timeline .u-over", 10).await?;
    // The pointer on the chart first: the axis then holds still (after
    // any reload already under way).
    let hover = MouseActions::new("mouse".into()).then(PointerAction::MoveToElement {
        element: over.clone(),
        duration: None,
        x: 0.0,
        y: 0.0,
    });
    step(
        "hover the timeline",
        b.client.perform_actions(Actions::from(hover)).await,
    )?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let x = loop {
        let x = b
            .eval(&format!(
                "return document.getElementById('timeline').tidemarkTimeline.offsetOf({name:?});"
            ))
            .await?;
        if let Some(x) = x.as_f64() {
            break x;
        }
        ensure(Instant::now() < deadline, || {
            format!("mark {name} is not on the timeline")
        })?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (_, _, width, height) = step("plot size", over.rectangle().await)?;
    let mouse = MouseActions::new("mouse".into())
        .then(PointerAction::MoveToElement {
            element: over,
            duration: None,
            x: x - width / 2.0,
            y: 10.0 - height / 2.0,
        })
        .then(PointerAction::Down {
            button: MOUSE_BUTTON_LEFT,
        })
        .then(PointerAction::Up {
            button: MOUSE_BUTTON_LEFT,
        });
    step(
        "click the timeline",
        b.client.perform_actions(Actions::from(mouse)).await,
    )
}

#[test]
fn a_user_picks_a_tag_on_the_timeline_exports_it_and_rolls_back() {
    let (d, first, second) = daemon_with_history();
    runtime().block_on(async {
        let Some(b) = Browser::start("recover", 1280, 800, output()).await else {
            return;
        };
        let scenario = async {
            open_console(&b, &d).await?;
            b.wait_for_text("#volumes tbody", 5, "volume db", |t| t.contains("db"))
                .await?;

            // Pick the tag where the timeline draws it.
            click_mark(&b, "good").await?;
            b.wait_for_text("#chosen", 10, "tag:good", |t| t.contains("tag:good"))
                .await?;

            // Export it: the URI reads the tagged state.
            b.click("#do-export").await?;
            let uri = b
                .wait_for_text("#export-uri", 10, "an NBD URI", |t| t.starts_with("nbd://"))
                .await?;
            ensure(head_of(&d, &uri, first.len()) == first, || {
                format!("{uri} does not read the state at tag good")
            })?;
            ensure(head_of(&d, &d.uri("db"), second.len()) == second, || {
                "the live volume changed before the rollback".into()
            })?;

            // Roll back: the dialog names the volume and the point.
            b.click("#do-rollback").await?;
            let text = b
                .wait_for_text("#confirm-text", 5, "the volume and point", |t| {
                    t.contains("db") && t.contains("tag:good")
                })
                .await?;
            ensure(text.contains("Volume db"), || text.clone())?;
            let ok = b.wait_for("#confirm-ok", 5).await?;
            let label = step("button label", ok.text().await)?;
            ensure(label == "Roll back db to tag:good", || {
                format!("the confirm button says {label:?}")
            })?;
            b.click("#confirm-ok").await?;
            b.wait_for_text("#action-result", 30, "the rollback's report", |t| {
                t.contains("rolled db back")
            })
            .await?;
            b.wait_for_text("#mark-list", 15, "the rollback event", |t| {
                t.contains("event: rollback")
            })
            .await?;
            // Its job, with a full progress bar.
            b.wait_for_text("#job-list", 10, "the rollback's job", |t| {
                t.contains("roll back db to tag:good") && t.contains("done")
            })
            .await?;
            let full = b
                .eval(
                    "const p = document.querySelector('[data-kind=rollback] progress'); \
                     return p ? p.value : -1;",
                )
                .await?;
            ensure(full == serde_json::json!(100), || {
                format!("the rollback's progress bar stands at {full}")
            })?;
            ensure(head_of(&d, &d.uri("db"), first.len()) == first, || {
                "after the rollback the live volume is not at tag good".into()
            })?;
            if let Some(path) = std::env::var_os("TIDEMARK_CONSOLE_SCREENSHOT") {
                // docs/console.png: the page from its top.
                b.eval("window.scrollTo(0, 0); return true;").await?;
                tokio::time::sleep(Duration::from_millis(300)).await;
                let png = step("screenshot", b.client.screenshot().await)?;
                std::fs::write(path, png).map_err(|e| e.to_string())?;
            }
            Ok(())
        };
        let result = scenario.await;
        b.finish(result).await;
    });
}

#[test]
fn the_page_follows_the_cli_live_and_fits_a_phone() {
    let (d, _, _) = daemon_with_history();
    runtime().block_on(async {
        let Some(b) = Browser::start("live", 390, 844, output()).await else {
            return;
        };
        let scenario = async {
            open_console(&b, &d).await?;

            // A tag made elsewhere appears without a reload.
            d.ok(&["tag", "create", "db", "from-cli"]);
            b.wait_for("#mark-list li[data-name=from-cli]", 10).await?;

            // Nothing wider than a phone's screen but the tables' own
            // scrolling boxes.
            let fits = b
                .eval("return document.documentElement.scrollWidth <= window.innerWidth + 1;")
                .await?;
            ensure(fits == serde_json::Value::Bool(true), || {
                "the page is wider than a phone's screen".into()
            })?;

            // The keyboard reaches the timeline and steps between marks.
            let timeline = b.wait_for("#timeline", 5).await?;
            step("focus", timeline.send_keys("\u{E012}").await)?; // ArrowLeft
            b.wait_for_text("#chosen", 10, "a chosen point", |t| t.contains("Seq"))
                .await?;
            let search = b.wait_for("#mark-search", 5).await?;
            step("search", search.send_keys("from-cli").await)?;
            let shown = step(
                "list",
                b.client.find_all(Locator::Css("#mark-list li")).await,
            )?;
            ensure(shown.len() == 1, || {
                format!("searching shows {} marks, not 1", shown.len())
            })?;
            Ok(())
        };
        let result = scenario.await;
        b.finish(result).await;
    });
}
