//! A TCP proxy under the test's control, for putting faults between two components (e.g. an
//! agent and its gateway): accepts on 127.0.0.1:0 and forwards every connection to a target.
//! [`Proxy::start_balanced`] makes it a load balancer: each connection goes to the first of
//! several targets that accepts it, as a Service skips an endpoint that stopped listening.
//!
//! - [`Proxy::cut`] closes every open connection at once (both sides see the connection end);
//!   new connections are accepted and forwarded as before.
//! - [`Proxy::blackhole`] stops forwarding bytes, in both directions, on open and new
//!   connections, without closing anything: both sides see a silent peer.
//! - [`Proxy::resume`] forwards again (bytes held during a blackhole are then delivered).
//! - [`Proxy::swallow_replies`] makes the connections open now deliver what the client sends
//!   but drop everything the target answers: a request that is carried out whose answer never
//!   comes. New connections are forwarded as before.
//!
//! Dropping the proxy closes its listener and every connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

struct Shared {
    /// Tried in order for each connection: the first that accepts gets it.
    targets: Vec<SocketAddr>,
    /// Cancelled by `cut`: every connection accepted before holds a clone of it.
    generation: Mutex<CancellationToken>,
    /// Whether bytes are forwarded (false while blackholed).
    forwarding: watch::Sender<bool>,
    /// Ends everything when the proxy is dropped.
    closed: CancellationToken,
    accepted: AtomicUsize,
    open: AtomicUsize,
    /// Connections numbered below this have their replies dropped.
    swallow_below: AtomicUsize,
}

/// See the module documentation.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: JoinHandle<()>,
}

impl Proxy {
    /// Listens on 127.0.0.1:0 and forwards to `target`. Must be called within a Tokio runtime,
    /// which runs the proxy.
    ///
    /// # Errors
    /// When it cannot listen.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        Self::start_on("127.0.0.1".parse().expect("loopback"), target).await
    }

    /// As [`Proxy::start`], listening on `ip` (port 0): e.g. the address of a server whose
    /// certificate names its IP, so that clients verify it through the proxy.
    ///
    /// # Errors
    /// When it cannot listen.
    pub async fn start_on(ip: std::net::IpAddr, target: SocketAddr) -> anyhow::Result<Self> {
        Self::listen(ip, vec![target]).await
    }

    /// A load balancer on 127.0.0.1:0: each new connection goes to the first of `targets`
    /// that accepts it.
    ///
    /// # Errors
    /// When it cannot listen.
    pub async fn start_balanced(targets: &[SocketAddr]) -> anyhow::Result<Self> {
        Self::listen("127.0.0.1".parse().expect("loopback"), targets.to_vec()).await
    }

    async fn listen(ip: std::net::IpAddr, targets: Vec<SocketAddr>) -> anyhow::Result<Self> {
        let listener = TcpListener::bind((ip, 0)).await.context("proxy listen")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            targets,
            generation: Mutex::new(CancellationToken::new()),
            forwarding: watch::Sender::new(true),
            closed: CancellationToken::new(),
            accepted: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            swallow_below: AtomicUsize::new(0),
        });
        let acceptor = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Self {
            addr,
            shared,
            acceptor,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every open connection (new ones are still accepted and forwarded).
    pub fn cut(&self) {
        let old = std::mem::replace(
            &mut *self.shared.generation.lock().expect("proxy generation"),
            CancellationToken::new(),
        );
        old.cancel();
    }

    /// Stops forwarding, without closing any connection.
    pub fn blackhole(&self) {
        self.shared.forwarding.send_replace(false);
    }

    /// Forwards again after [`Proxy::blackhole`].
    pub fn resume(&self) {
        self.shared.forwarding.send_replace(true);
    }

    /// From now on, the connections open now drop every byte the target sends (see the
    /// module documentation).
    pub fn swallow_replies(&self) {
        let accepted = self.shared.accepted.load(Ordering::SeqCst);
        self.shared.swallow_below.store(accepted, Ordering::SeqCst);
    }

    /// Connections accepted since the start.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections open now (accepted and not yet closed).
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Waits until `accepted() >= n`.
    ///
    /// # Errors
    /// When that does not happen within `within`.
    pub async fn wait_accepted(&self, n: usize, within: Duration) -> anyhow::Result<()> {
        let start = tokio::time::Instant::now();
        while self.accepted() < n {
            if start.elapsed() > within {
                bail!(
                    "proxy accepted {} connection(s) within {within:?}, expected {n}",
                    self.accepted()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Waits until no connection is open (e.g. after [`Proxy::cut`]).
    ///
    /// # Errors
    /// When connections are still open after `within`.
    pub async fn wait_closed(&self, within: Duration) -> anyhow::Result<()> {
        let start = tokio::time::Instant::now();
        while self.open_connections() > 0 {
            if start.elapsed() > within {
                bail!(
                    "{} proxied connection(s) still open after {within:?}",
                    self.open_connections()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.closed.cancel();
        self.acceptor.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            _ = shared.closed.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((client, _)) = accepted else {
            // e.g. too many open files: keep serving
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let number = shared.accepted.fetch_add(1, Ordering::SeqCst);
        shared.open.fetch_add(1, Ordering::SeqCst);
        let generation = shared.generation.lock().expect("proxy generation").clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = generation.cancelled() => {}
                _ = shared.closed.cancelled() => {}
                _ = connection(client, number, &shared) => {}
            }
            // Both sockets are dropped here: a cut closes them.
            shared.open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// Forwards one connection until both directions end or one fails.
async fn connection(client: TcpStream, number: usize, shared: &Shared) {
    let mut upstream = None;
    for target in &shared.targets {
        if let Ok(s) = TcpStream::connect(target).await {
            upstream = Some(s);
            break;
        }
    }
    let Some(upstream) = upstream else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let failed = CancellationToken::new();
    let up = pump(
        cr,
        uw,
        shared.forwarding.subscribe(),
        failed.clone(),
        &|| false,
    );
    let swallowed = || number < shared.swallow_below.load(Ordering::SeqCst);
    let down = pump(
        ur,
        cw,
        shared.forwarding.subscribe(),
        failed.clone(),
        &swallowed,
    );
    tokio::join!(up, down);
}

/// Copies `from` to `to` while forwarding is on; on EOF half-closes `to`; on an error, ends
/// the other direction too (`failed`).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut forwarding: watch::Receiver<bool>,
    failed: CancellationToken,
    swallowed: &(dyn Fn() -> bool + Sync),
) {
    let mut buf = vec![0u8; 16 * 1024];
    let work = async {
        loop {
            // While blackholed nothing is read (the sender sees backpressure) nor written.
            forwarding.wait_for(|f| *f).await.ok()?;
            let n = from.read(&mut buf).await.ok()?;
            if n == 0 {
                let _ = to.shutdown().await;
                return Some(());
            }
            forwarding.wait_for(|f| *f).await.ok()?;
            if !swallowed() {
                to.write_all(&buf[..n]).await.ok()?;
            }
        }
    };
    tokio::select! {
        r = work => if r.is_none() { failed.cancel() },
        _ = failed.cancelled() => {}
    }
}
