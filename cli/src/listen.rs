//! The node's connection handling: how many connections it keeps, and how long it lets each be
//! slow or idle. A node that accepts every connection and waits forever on each can be taken
//! down by clients that merely connect (slowloris: headers sent a byte at a time; or
//! connections opened and left idle) until it runs out of file descriptors and every normal
//! request times out, silently. So:
//!
//! * at most `http.max_connections` are open at once; one more is answered `503` with a JSON
//!   body and closed at once, counted in `troupe_http_connections_refused_total` and logged
//!   (at most once a second);
//! * a request's headers must arrive within `http.header_read_timeout` (hyper's own timeout);
//! * a connection idle between requests for `http.idle_timeout` is closed (a request in
//!   progress — one waiting for its task's outcome — is not idle);
//! * a request body must arrive within `http.body_timeout` (see the server's body reader).
//!
//! Open connections are the `troupe_http_connections` gauge. At shutdown the listener stops
//! accepting, asks each connection to finish its request in progress and close, and waits for
//! them up to a deadline.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// Connection limits and timeouts.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// Time for a request's headers to arrive.
    pub header_read_timeout: Duration,
    /// Time a connection may sit idle between requests.
    pub idle_timeout: Duration,
}

/// The listener's counters.
pub struct ConnMetrics {
    /// Open connections.
    pub open: metrics::Gauge,
    /// Connections refused for being one too many.
    pub refused: metrics::Counter,
}

/// What a connection past the limit is told before it is closed.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
connection: close\r\nretry-after: 1\r\ncontent-length: 98\r\n\r\n\
{\"error\":\"too_many_connections\",\"message\":\"the node is at its connection limit; retry later\"}";

/// Counts the open connections and wakes a waiting shutdown when the last one closes.
#[derive(Default)]
struct Open {
    count: AtomicUsize,
    none_left: Notify,
}

struct OpenGuard(Arc<Open>, metrics::Gauge);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.none_left.notify_waiters();
        }
        self.1.decrement(1.0);
    }
}

/// Serves `app` on `listener` within `limits` until `shutdown` resolves, then lets open
/// connections finish their request in progress for up to `drain`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    metrics: ConnMetrics,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) -> std::io::Result<()> {
    let open = Arc::new(Open::default());
    let stop = Arc::new(tokio_util::sync::CancellationToken::new());
    let last_refusal_log = AtomicU64::new(0);
    let started = Instant::now();
    let service = TowerToHyperService::new(app);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors or a reset before accept: keep serving the rest.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        if open.count.load(Ordering::Acquire) >= limits.max_connections {
            metrics.refused.increment(1);
            let now = started.elapsed().as_secs();
            if last_refusal_log.swap(now, Ordering::Relaxed) != now {
                tracing::warn!(
                    %peer,
                    limit = limits.max_connections,
                    "connection refused: the node is at http.max_connections"
                );
            }
            tokio::spawn(async move {
                let mut stream = stream;
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), stream.write_all(REFUSAL)).await;
                let _ = stream.shutdown().await;
            });
            continue;
        }
        open.count.fetch_add(1, Ordering::AcqRel);
        metrics.open.increment(1.0);
        let guard = OpenGuard(open.clone(), metrics.open.clone());
        let service = service.clone();
        let stop = stop.clone();
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _guard = guard;
            let io = Activity::new(TokioIo::new(stream));
            let activity = io.clock.clone();
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .keep_alive(true);
            let service = CountedService {
                inner: service,
                clock: activity.clone(),
            };
            let conn = builder.serve_connection(io, service);
            tokio::pin!(conn);
            let mut check = tokio::time::interval(limits.idle_timeout.min(Duration::from_secs(1)));
            check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut closing = false;
            loop {
                tokio::select! {
                    _ = conn.as_mut() => break,
                    _ = stop.cancelled(), if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    _ = check.tick(), if !closing => {
                        if activity.idle_for() >= limits.idle_timeout {
                            closing = true;
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                }
            }
        });
    }
    drop(listener);
    stop.cancel();
    let deadline = Instant::now() + drain;
    while open.count.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
        let notified = open.none_left.notified();
        if open.count.load(Ordering::Acquire) == 0 {
            break;
        }
        let _ = tokio::time::timeout_at(deadline.into(), notified).await;
    }
    Ok(())
}

/// When a connection last moved bytes, and how many of its requests are in progress (a
/// request waiting for its task's outcome moves no bytes but is not idle).
struct Clock {
    epoch: Instant,
    last_ms: AtomicU64,
    busy: AtomicUsize,
}

impl Clock {
    fn touch(&self) {
        self.last_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long the connection has been idle: zero while a request is in progress.
    fn idle_for(&self) -> Duration {
        if self.busy.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        let last = self.last_ms.load(Ordering::Relaxed);
        Duration::from_millis((self.epoch.elapsed().as_millis() as u64).saturating_sub(last))
    }
}

/// Marks its connection busy while a request's handler runs.
struct Busy(Arc<Clock>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
        self.0.touch();
    }
}

pin_project_lite::pin_project! {
    /// A request's response future, holding its connection busy until it is done.
    struct Counted<F> {
        #[pin]
        inner: F,
        busy: Busy,
    }
}

impl<F: Future> Future for Counted<F> {
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        self.project().inner.poll(cx)
    }
}

/// The app as a hyper service that counts its requests in progress on one connection.
#[derive(Clone)]
struct CountedService<S> {
    inner: S,
    clock: Arc<Clock>,
}

impl<S, R> hyper::service::Service<R> for CountedService<S>
where
    S: hyper::service::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Counted<S::Future>;

    fn call(&self, req: R) -> Self::Future {
        self.clock.busy.fetch_add(1, Ordering::AcqRel);
        Counted {
            inner: self.inner.call(req),
            busy: Busy(self.clock.clone()),
        }
    }
}

/// An IO wrapper that records when the connection last moved bytes.
struct Activity<T> {
    inner: T,
    clock: Arc<Clock>,
}

impl<T> Activity<T> {
    fn new(inner: T) -> Self {
        let clock = Arc::new(Clock {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
        });
        Activity { inner, clock }
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for Activity<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        let r = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        if r.is_ready() {
            this.clock.touch();
        }
        r
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for Activity<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let r = std::pin::Pin::new(&mut this.inner).poll_write(cx, buf);
        if r.is_ready() {
            this.clock.touch();
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        let r = std::pin::Pin::new(&mut this.inner).poll_flush(cx);
        if r.is_ready() {
            this.clock.touch();
        }
        r
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let r = std::pin::Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if r.is_ready() {
            this.clock.touch();
        }
        r
    }
}
