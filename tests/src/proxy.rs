//! A fault-injecting TCP proxy for the link between two sites: it forwards
//! bytes both ways on loopback and, on demand, drops the link (severs every
//! connection and refuses new ones), stalls it (holds the bytes, keeps the
//! connections open), delays every chunk, or severs connections in the
//! middle of a message after a number of bytes. Its upstream can be moved,
//! so a replica daemon restarted on a new port stays behind one address.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

#[derive(Debug, Default)]
struct State {
    upstream: Mutex<String>,
    /// Refuse new connections (and the open ones were severed).
    down: AtomicBool,
    /// Hold every byte until released.
    stalled: AtomicBool,
    /// Delay before each chunk is forwarded, in microseconds.
    delay_us: AtomicU64,
    /// Sever a connection once this many more bytes went towards the
    /// upstream (0: never).
    sever_after: AtomicU64,
    /// Bytes forwarded towards the upstream / back.
    to_upstream: AtomicU64,
    from_upstream: AtomicU64,
    connections: Mutex<Vec<TcpStream>>,
    accepted: AtomicU64,
    closed: AtomicBool,
}

/// A running proxy; it stops when dropped.
#[derive(Debug)]
pub struct Proxy {
    /// `127.0.0.1:PORT` to connect to.
    pub address: String,
    state: Arc<State>,
}

impl Proxy {
    /// A proxy on a free loopback port forwarding to `upstream`.
    pub fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let address = listener.local_addr().expect("proxy address").to_string();
        let state = Arc::new(State::default());
        *state.upstream.lock() = upstream
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .to_string();
        let accepting = state.clone();
        std::thread::spawn(move || accept(listener, accepting));
        Proxy { address, state }
    }

    /// Forwards to `upstream` from the next connection on.
    pub fn set_upstream(&self, upstream: &str) {
        *self.state.upstream.lock() = upstream
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .to_string();
    }

    /// Drops the link: severs every connection, refuses new ones.
    pub fn drop_link(&self) {
        let mut open = self.state.connections.lock();
        self.state.down.store(true, Ordering::SeqCst);
        for c in open.drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Lets connections through again (after `drop_link` or `stall`).
    pub fn restore(&self) {
        self.state.down.store(false, Ordering::SeqCst);
        self.state.stalled.store(false, Ordering::SeqCst);
        self.state.delay_us.store(0, Ordering::SeqCst);
        self.state.sever_after.store(0, Ordering::SeqCst);
    }

    /// Holds every byte both ways, connections open: a link that says
    /// nothing.
    pub fn stall(&self) {
        self.state.stalled.store(true, Ordering::SeqCst);
    }

    /// Delays every chunk forwarded by `delay`.
    pub fn delay(&self, delay: Duration) {
        self.state
            .delay_us
            .store(delay.as_micros() as u64, Ordering::SeqCst);
    }

    /// Severs the connection carrying the next `bytes` bytes towards the
    /// upstream right after them: in the middle of whatever message they
    /// belong to.
    pub fn sever_after(&self, bytes: u64) {
        self.state.sever_after.store(bytes, Ordering::SeqCst);
    }

    /// Severs every open connection now.
    pub fn sever(&self) {
        for c in self.state.connections.lock().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Bytes forwarded towards the upstream so far.
    pub fn bytes_to_upstream(&self) -> u64 {
        self.state.to_upstream.load(Ordering::SeqCst)
    }

    /// Bytes forwarded back from the upstream so far.
    pub fn bytes_from_upstream(&self) -> u64 {
        self.state.from_upstream.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.closed.store(true, Ordering::SeqCst);
        self.sever();
        // Wake the accept loop so it sees `closed`.
        let _ = TcpStream::connect(&self.address);
    }
}

fn accept(listener: TcpListener, state: Arc<State>) {
    for client in listener.incoming() {
        if state.closed.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        if state.down.load(Ordering::SeqCst) {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let upstream = state.upstream.lock().clone();
        let Ok(server) = TcpStream::connect(&upstream) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        state.accepted.fetch_add(1, Ordering::SeqCst);
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        {
            // (Under the lock `drop_link` takes: a connection accepted while
            // the link was being dropped is not left open.)
            let mut open = state.connections.lock();
            if state.down.load(Ordering::SeqCst) {
                let _ = client.shutdown(Shutdown::Both);
                let _ = server.shutdown(Shutdown::Both);
                continue;
            }
            open.retain(|c| c.peer_addr().is_ok());
            open.push(client.try_clone().expect("clone"));
            open.push(server.try_clone().expect("clone"));
        }
        let (c2, s2) = (
            client.try_clone().expect("clone"),
            server.try_clone().expect("clone"),
        );
        let up = state.clone();
        std::thread::spawn(move || pump(client, server, up, true));
        let down = state.clone();
        std::thread::spawn(move || pump(s2, c2, down, false));
    }
}

/// Forwards `from` to `to` until either closes, obeying the faults.
fn pump(mut from: TcpStream, mut to: TcpStream, state: Arc<State>, upstream: bool) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while state.stalled.load(Ordering::SeqCst) && !state.closed.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let delay = state.delay_us.load(Ordering::SeqCst);
        if delay > 0 {
            std::thread::sleep(Duration::from_micros(delay));
        }
        let mut chunk = &buf[..n];
        let mut sever = false;
        if upstream {
            let budget = state.sever_after.load(Ordering::SeqCst);
            if budget > 0 {
                if (chunk.len() as u64) >= budget {
                    chunk = &chunk[..budget as usize];
                    state.sever_after.store(0, Ordering::SeqCst);
                    sever = true;
                } else {
                    state
                        .sever_after
                        .store(budget - chunk.len() as u64, Ordering::SeqCst);
                }
            }
        }
        if to.write_all(chunk).is_err() {
            break;
        }
        let counter = if upstream {
            &state.to_upstream
        } else {
            &state.from_upstream
        };
        counter.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        if sever {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
