//! A TCP proxy on 127.0.0.1 in front of the test S3 server, so a test can take storage away
//! without losing the server's state (moto keeps buckets in memory; restarting it would empty
//! them): `down()` resets every open connection and refuses new ones until `up()`, and
//! `freeze()` holds all traffic in place (requests hang mid-flight) until `up()`.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const UP: u8 = 0;
const DOWN: u8 = 1;
const FROZEN: u8 = 2;

pub struct TcpProxy {
    pub port: u16,
    mode: Arc<AtomicU8>,
    /// Both ends of every connection, so `down()` can cut them.
    open: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl TcpProxy {
    pub fn start(upstream_port: u16) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().unwrap().port();
        let proxy = TcpProxy {
            port,
            mode: Arc::new(AtomicU8::new(UP)),
            open: Arc::default(),
            stop: Arc::default(),
        };
        let (mode, open, stop) = (
            Arc::clone(&proxy.mode),
            Arc::clone(&proxy.open),
            Arc::clone(&proxy.stop),
        );
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                if mode.load(Ordering::SeqCst) == DOWN {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                {
                    let mut open = open.lock().unwrap();
                    open.push(client.try_clone().unwrap());
                    open.push(server.try_clone().unwrap());
                }
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let mode = Arc::clone(&mode);
                    std::thread::spawn(move || pump(from, to, &mode));
                }
            }
        });
        proxy
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Storage unreachable: open connections are reset, new ones refused.
    pub fn down(&self) {
        self.mode.store(DOWN, Ordering::SeqCst);
        for stream in self.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// Traffic stops where it is: requests in flight hang.
    pub fn freeze(&self) {
        self.mode.store(FROZEN, Ordering::SeqCst);
    }

    /// Back to normal; connections a freeze held go on (or error, if their client is gone).
    pub fn up(&self) {
        self.mode.store(UP, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.down();
        // Wake the accept loop so it sees `stop`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Copies `from` → `to` until either side closes; holds data while frozen, drops the
/// connection when the proxy goes down.
fn pump(mut from: TcpStream, mut to: TcpStream, mode: &AtomicU8) {
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while mode.load(Ordering::SeqCst) == FROZEN {
            std::thread::sleep(Duration::from_millis(5));
        }
        if mode.load(Ordering::SeqCst) == DOWN || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}
