//! A real browser for the console's tests: Debian's Chromium, headless,
//! driven over WebDriver by a `chromedriver` started on a free loopback
//! port for each test. A scenario that fails leaves a screenshot of the
//! page (and its HTML, and chromedriver's log) in the directory the test
//! names: the tests use cargo's per-target scratch directory.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};

/// What a scenario step returns: a failure says what was wrong.
pub type Step<T = ()> = Result<T, String>;

/// Turns any error into a step failure that says what was being done.
pub fn step<T, E: std::fmt::Display>(what: &str, r: Result<T, E>) -> Step<T> {
    r.map_err(|e| format!("{what}: {e}"))
}

/// Fails the step with `message` unless `ok`.
pub fn ensure(ok: bool, message: impl FnOnce() -> String) -> Step {
    if ok {
        Ok(())
    } else {
        Err(message())
    }
}

/// A headless Chromium and the chromedriver that drives it.
pub struct Browser {
    /// The WebDriver session.
    pub client: Client,
    driver: Child,
    name: String,
    output: PathBuf,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browser")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Browser {
    /// Starts a browser for test `name` with a window of `width`×`height`,
    /// leaving what a failure shows in `output`; or prints why it cannot
    /// and returns None.
    pub async fn start(name: &str, width: u32, height: u32, output: PathBuf) -> Option<Browser> {
        if !crate::require("chromium", name) || !crate::require("chromedriver", name) {
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        std::fs::create_dir_all(&output).expect("test output directory");
        let log = output.join(format!("{name}.chromedriver.log"));
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen on 127.0.0.1:{port} (see {})",
                log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--disable-extensions",
                    format!("--window-size={width},{height}"),
                ],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "chromedriver would not start a Chromium session: {e} (see {})",
                    log.display()
                )
            });
        Some(Browser {
            client,
            driver,
            name: name.to_string(),
            output,
        })
    }

    /// Runs the scenario's result through: on failure, saves a screenshot
    /// and the page's text, then fails the test with the reason.
    pub async fn finish(self, result: Step) {
        if let Err(reason) = &result {
            let shot = self.output.join(format!("{}.png", self.name));
            match self.client.screenshot().await {
                Ok(png) => {
                    let _ = std::fs::write(&shot, png);
                    eprintln!("screenshot of the failed scenario: {}", shot.display());
                }
                Err(e) => eprintln!("no screenshot: {e}"),
            }
            if let Ok(text) = self.client.source().await {
                let page = self.output.join(format!("{}.html", self.name));
                let _ = std::fs::write(&page, text);
                eprintln!("the page: {}", page.display());
            }
            let _ = self.client.clone().close().await;
            panic!("{}: {reason}", self.name);
        }
        let _ = self.client.clone().close().await;
    }

    /// The element `css` once it is there (waits up to `secs`).
    pub async fn wait_for(&self, css: &str, secs: u64) -> Step<fantoccini::elements::Element> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Ok(e) = self.client.find(Locator::Css(css)).await {
                return Ok(e);
            }
            if Instant::now() > deadline {
                return Err(format!("{css} did not appear within {secs} s"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits up to `secs` until the text of `css` satisfies `check`;
    /// returns that text.
    pub async fn wait_for_text(
        &self,
        css: &str,
        secs: u64,
        what: &str,
        check: impl Fn(&str) -> bool,
    ) -> Step<String> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut last = String::new();
        loop {
            if let Ok(e) = self.client.find(Locator::Css(css)).await {
                if let Ok(text) = e.text().await {
                    if check(&text) {
                        return Ok(text);
                    }
                    last = text;
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{css} never showed {what} within {secs} s; it shows {last:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Clicks the element `css`.
    pub async fn click(&self, css: &str) -> Step {
        let e = self.wait_for(css, 10).await?;
        step(&format!("click {css}"), e.click().await)
    }

    /// Types `text` into the field `css` (after clearing it).
    pub async fn type_into(&self, css: &str, text: &str) -> Step {
        let e = self.wait_for(css, 10).await?;
        step(&format!("clear {css}"), e.clear().await)?;
        step(&format!("type into {css}"), e.send_keys(text).await)
    }

    /// Runs `script` in the page and returns its value.
    pub async fn eval(&self, script: &str) -> Step<serde_json::Value> {
        step(
            &format!("run {script:?}"),
            self.client.execute(script, vec![]).await,
        )
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
