//! How many connections the appliance holds, and from whom. Every TCP connection takes a
//! file descriptor and some memory before a byte of HTTP is read, so a stranger with slow,
//! unfinished requests could exhaust the process (and then lab hosts' heartbeats stop and
//! labs fail). The gate admits a connection only under a global cap and a per-client cap
//! (an IPv6 client by its /64), and keeps part of the global cap for the lab hosts'
//! addresses, so their heartbeats get through any flood. A refused connection is closed at
//! once; the time a connection may take to send its headers is bounded by the HTTP
//! server's settings (see `serve`).

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::attempts::client_key;

/// The caps (see the README's settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// connections at once, in all
    pub max: usize,
    /// connections at once from one client
    pub per_client: usize,
    /// of `max`, kept for lab hosts
    pub reserved_for_hosts: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max: 4_096,
            per_client: 64,
            reserved_for_hosts: 256,
        }
    }
}

impl ConnectionLimits {
    /// The caps, lowered to fit the process's file-descriptor limit (with room for the
    /// database, the logs and the lab connections the appliance opens itself).
    pub fn within_nofile(self, nofile: u64) -> Self {
        let room = usize::try_from(nofile.saturating_sub(512))
            .unwrap_or(usize::MAX)
            .max(64);
        let max = self.max.min(room);
        Self {
            max,
            per_client: self.per_client.min(max),
            reserved_for_hosts: self.reserved_for_hosts.min(max / 2),
        }
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the appliance holds its maximum of connections")]
    Full,
    #[error("this client holds its maximum of connections")]
    ClientFull,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_client: HashMap<String, usize>,
}

/// Counts open connections; cheap enough to ask for each accept.
#[derive(Debug)]
pub struct ConnectionGate {
    limits: ConnectionLimits,
    counts: Mutex<Counts>,
    /// the addresses lab hosts call from (learnt from their signed calls and the database)
    hosts: RwLock<HashSet<IpAddr>>,
    refused: AtomicU64,
}

impl ConnectionGate {
    pub fn new(limits: ConnectionLimits) -> Self {
        Self {
            limits,
            counts: Mutex::default(),
            hosts: RwLock::default(),
            refused: AtomicU64::new(0),
        }
    }

    pub fn limits(&self) -> ConnectionLimits {
        self.limits
    }

    /// Remembers that a lab host calls from `ip`.
    pub fn note_host(&self, ip: IpAddr) {
        let known = self
            .hosts
            .read()
            .map(|hosts| hosts.contains(&ip))
            .unwrap_or(false);
        if !known && let Ok(mut hosts) = self.hosts.write() {
            hosts.insert(ip.to_canonical());
        }
    }

    fn is_host(&self, ip: IpAddr) -> bool {
        self.hosts
            .read()
            .map(|hosts| hosts.contains(&ip.to_canonical()))
            .unwrap_or(false)
    }

    /// A permit for one connection from `ip`, released when dropped.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionPermit, Refused> {
        let host = self.is_host(ip);
        let key = client_key(ip);
        let mut counts = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let cap = if host {
            self.limits.max
        } else {
            self.limits
                .max
                .saturating_sub(self.limits.reserved_for_hosts)
        };
        let refused = if counts.total >= cap {
            Some(Refused::Full)
        } else if !host
            && counts.per_client.get(&key).copied().unwrap_or(0) >= self.limits.per_client
        {
            Some(Refused::ClientFull)
        } else {
            None
        };
        if let Some(refused) = refused {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(refused);
        }
        counts.total += 1;
        *counts.per_client.entry(key.clone()).or_default() += 1;
        Ok(ConnectionPermit {
            gate: self.clone(),
            key,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.counts.lock().map(|c| c.total).unwrap_or(0)
    }

    /// Connections refused since start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    fn release(&self, key: &str) {
        let mut counts = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.per_client.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.per_client.remove(key);
            }
        }
    }
}

/// One admitted connection.
#[derive(Debug)]
pub struct ConnectionPermit {
    gate: Arc<ConnectionGate>,
    key: String,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.gate.release(&self.key);
    }
}

/// A TCP stream that holds its permit for as long as it is open.
#[derive(Debug)]
pub struct GatedStream {
    inner: TcpStream,
    _permit: ConnectionPermit,
}

impl AsyncRead for GatedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for GatedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The axum-server acceptor that asks the gate (before any TLS handshake).
#[derive(Debug, Clone)]
pub struct GateAcceptor {
    gate: Arc<ConnectionGate>,
}

impl GateAcceptor {
    pub fn new(gate: Arc<ConnectionGate>) -> Self {
        Self { gate }
    }
}

impl<S> axum_server::accept::Accept<TcpStream, S> for GateAcceptor {
    type Stream = GatedStream;
    type Service = S;
    type Future = std::future::Ready<io::Result<(GatedStream, S)>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let admitted = stream.peer_addr().and_then(|peer| {
            self.gate.admit(peer.ip()).map_err(|refused| {
                tracing::debug!(peer = %peer, %refused, "connection refused");
                io::Error::other(refused)
            })
        });
        std::future::ready(admitted.map(|permit| {
            let _ = stream.set_nodelay(true);
            (
                GatedStream {
                    inner: stream,
                    _permit: permit,
                },
                service,
            )
        }))
    }
}

/// How much lower than request handling a TLS handshake runs (a nice value).
const HANDSHAKE_NICE: i32 = 5;

/// Threads of their own for TLS handshakes, the costliest work a stranger can ask for
/// before anyone knows who they are. They run at a lower CPU priority than request
/// handling, so a burst of new connections (a thousand logins at once) delays new
/// connections, not the requests of those already open.
pub struct HandshakeThreads {
    runtime: Option<tokio::runtime::Runtime>,
}

impl HandshakeThreads {
    pub fn start(threads: usize) -> io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("tls-handshake")
            .on_thread_start(|| {
                labrack_serving::priority::lower_this_threads_priority(
                    HANDSHAKE_NICE,
                    "tls-handshake",
                );
            })
            .enable_all()
            .build()?;
        Ok(Self {
            runtime: Some(runtime),
        })
    }

    fn handle(&self) -> Option<tokio::runtime::Handle> {
        self.runtime
            .as_ref()
            .map(|runtime| runtime.handle().clone())
    }
}

impl Drop for HandshakeThreads {
    fn drop(&mut self) {
        // Dropped from async code at shutdown: do not wait for handshakes in flight.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The axum-server acceptor for HTTPS: the gate first (before any TLS work), then the
/// handshake on [`HandshakeThreads`] within `timeout`.
#[derive(Clone)]
pub struct GatedTlsAcceptor {
    gate: GateAcceptor,
    tls: tokio_rustls::TlsAcceptor,
    handshakes: tokio::runtime::Handle,
    timeout: std::time::Duration,
}

impl GatedTlsAcceptor {
    pub fn new(
        gate: GateAcceptor,
        config: Arc<rustls::ServerConfig>,
        handshakes: &HandshakeThreads,
        timeout: std::time::Duration,
    ) -> io::Result<Self> {
        let handshakes = handshakes
            .handle()
            .ok_or_else(|| io::Error::other("the handshake threads have stopped"))?;
        Ok(Self {
            gate,
            tls: tokio_rustls::TlsAcceptor::from(config),
            handshakes,
            timeout,
        })
    }
}

type Accepted<S> = io::Result<(tokio_rustls::server::TlsStream<GatedStream>, S)>;

impl<S: Send + 'static> axum_server::accept::Accept<TcpStream, S> for GatedTlsAcceptor {
    type Stream = tokio_rustls::server::TlsStream<GatedStream>;
    type Service = S;
    type Future = Pin<Box<dyn std::future::Future<Output = Accepted<S>> + Send>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let gated =
            axum_server::accept::Accept::<TcpStream, S>::accept(&self.gate, stream, service)
                .into_inner();
        let (tls, handshakes, timeout) = (self.tls.clone(), self.handshakes.clone(), self.timeout);
        Box::pin(async move {
            let (stream, service) = gated?;
            let handshake = handshakes
                .spawn(async move { tokio::time::timeout(timeout, tls.accept(stream)).await });
            match handshake.await {
                Ok(Ok(Ok(stream))) => Ok((stream, service)),
                Ok(Ok(Err(error))) => Err(error),
                Ok(Err(_elapsed)) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the TLS handshake took too long",
                )),
                Err(join) => Err(io::Error::other(join)),
            }
        })
    }
}

/// Raises this process's open-file limit to its hard limit; returns the soft limit now.
pub fn raise_nofile_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(error) => {
            tracing::warn!(%error, "could not raise the open-file limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE)
                .map(|(soft, _)| soft)
                .unwrap_or(1_024)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    #[test]
    fn a_client_cannot_take_more_than_its_share_and_hosts_keep_theirs() {
        let gate = Arc::new(ConnectionGate::new(ConnectionLimits {
            max: 12,
            per_client: 3,
            reserved_for_hosts: 4,
        }));
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(gate.admit(ip("10.0.0.9")).expect("within its share"));
        }
        assert_eq!(
            gate.admit(ip("10.0.0.9")).map(|_| ()),
            Err(Refused::ClientFull)
        );
        // a /64 is one client
        held.push(gate.admit(ip("2001:db8::1")).expect("ipv6"));
        held.push(gate.admit(ip("2001:db8::2")).expect("ipv6"));
        held.push(gate.admit(ip("2001:db8::3")).expect("ipv6"));
        assert_eq!(
            gate.admit(ip("2001:db8::4")).map(|_| ()),
            Err(Refused::ClientFull)
        );
        held.push(gate.admit(ip("10.0.0.50")).expect("room"));
        held.push(gate.admit(ip("10.0.0.51")).expect("room"));
        // 8 open, 12 - 4 reserved = 8 for strangers: full for them, not for a host
        assert_eq!(gate.admit(ip("10.0.0.52")).map(|_| ()), Err(Refused::Full));
        gate.note_host(ip("10.0.0.200"));
        for _ in 0..4 {
            held.push(
                gate.admit(ip("10.0.0.200"))
                    .expect("the reserve is the host's"),
            );
        }
        assert_eq!(
            gate.admit(ip("10.0.0.200")).map(|_| ()),
            Err(Refused::Full),
            "the global cap holds for hosts too"
        );
        assert_eq!(gate.open(), 12);
        assert_eq!(gate.refused(), 4);
        held.clear();
        assert_eq!(
            gate.open(),
            0,
            "permits are released when connections close"
        );
        assert!(gate.admit(ip("10.0.0.9")).is_ok());
    }

    #[test]
    fn the_caps_fit_the_file_descriptor_limit() {
        let limits = ConnectionLimits::default().within_nofile(1_024);
        assert_eq!(limits.max, 512);
        assert!(limits.reserved_for_hosts <= 256 && limits.per_client <= 64);
        assert_eq!(
            ConnectionLimits::default().within_nofile(1 << 20),
            ConnectionLimits::default()
        );
    }
}
