//! The embedded broker's front door: mutual TLS and the topic ACL in front
//! of rumqttd, which has neither per-client topic rules nor a way to tie a
//! client id to a certificate.
//!
//! Each connection: a TLS handshake that requires a client certificate
//! chaining to the fleet CA (rustls, ring); the certificate is verified
//! again for its role and checked against the revocations; then the gate
//! connects to rumqttd on loopback and relays. Broker-to-client bytes pass
//! as they are. Client-to-broker bytes are framed into MQTT 3.1.1 packets
//! (rumqttc's codec) and every CONNECT, PUBLISH and SUBSCRIBE is checked
//! with [`acl::Acl`]; the first refused packet closes the connection (as
//! AWS IoT does), so a device can never act as another or read what is not
//! its own, nor make the broker keep more than its topics' bounds. Handshakes
//! in progress and connections are capped, so strangers cannot make the gate
//! hold unbounded memory either. The decisions are in [`acl`] (pure); this
//! module is the I/O.

pub mod acl;

use acl::{Acl, Denied};
use bytes::BytesMut;
use dai_trust::{PeerCert, Revocations};
use parking_lot::RwLock;
use rumqttc::mqttbytes::{self, v4::Packet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest MQTT packet relayed (the broker's own bound plus headers);
/// each peer's own bound ([`Acl::max_packet`]) is at most this.
pub const MAX_PACKET: usize = dai_protocol::limits::MAX_MESSAGE_BYTES + 4096;
/// A client that has not finished the TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at once: what strangers can make the gate
/// hold before they prove anything. One more is closed at accept.
const MAX_HANDSHAKES: usize = 256;
/// Connections at once, authenticated or not (the broker's own
/// `max_connections` is the same): each may hold one packet buffer of its
/// peer's bound.
pub const MAX_CONNECTIONS: usize = 10_000;

/// What the gate needs.
#[derive(Clone)]
pub struct GateConfig {
    pub fleet: String,
    /// The fleet CA (PEM): who may connect.
    pub ca_pem: String,
    pub tls: Arc<dai_trust::tls::ServerConfig>,
    /// rumqttd's plain listener on loopback.
    pub upstream: SocketAddr,
    /// Kept current by the service (reloaded with the registry).
    pub revocations: Arc<RwLock<Revocations>>,
}

/// Connections refused, by reason (exported as metrics by the caller).
#[derive(Debug, Default)]
pub struct GateStats {
    pub handshake_failed: AtomicU64,
    pub revoked: AtomicU64,
    pub denied: AtomicU64,
    pub accepted: AtomicU64,
    /// Closed at accept: too many handshakes or connections at once.
    pub busy: AtomicU64,
}

/// Accept connections on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, cfg: GateConfig, stats: Arc<GateStats>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg.tls.clone());
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "gate: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let permits = (
            connections.clone().try_acquire_owned(),
            handshakes.clone().try_acquire_owned(),
        );
        let (Ok(connection_permit), Ok(handshake)) = permits else {
            stats.busy.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%from, "gate: too many connections or handshakes; closed");
            continue;
        };
        let (acceptor, cfg, stats) = (acceptor.clone(), cfg.clone(), stats.clone());
        tokio::spawn(async move {
            let _connection = connection_permit;
            match connection(tcp, from, acceptor, handshake, &cfg, &stats).await {
                // A peer going away mid-stream is routine.
                Err(GateError::Io(e)) => {
                    tracing::debug!(%from, error = %e, "gate: connection ended")
                }
                Err(e) => {
                    tracing::warn!(%from, error = %crate::error_chain(&e), "gate: connection refused or closed")
                }
                Ok(()) => {}
            }
        });
    }
}

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
enum GateError {
    #[error("TLS handshake failed")]
    Handshake(#[source] std::io::Error),
    #[error("TLS handshake timed out")]
    HandshakeTimeout,
    #[error("no client certificate")]
    NoCertificate,
    #[error("client certificate refused")]
    Certificate(#[source] dai_trust::TrustError),
    #[error("{role} {name:?} (serial {serial}) is revoked")]
    Revoked {
        role: dai_trust::Role,
        name: String,
        serial: dai_trust::Serial,
    },
    #[error("the broker behind the gate is unreachable")]
    Upstream(#[source] std::io::Error),
    #[error("refused")]
    Denied(#[source] Denied),
    #[error("not an MQTT 3.1.1 packet stream: {0}")]
    Mqtt(String),
    #[error("the first packet was not CONNECT")]
    NoConnect,
    #[error("relaying")]
    Io(#[source] std::io::Error),
}

async fn connection(
    tcp: TcpStream,
    from: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    handshake: tokio::sync::OwnedSemaphorePermit,
    cfg: &GateConfig,
    stats: &GateStats,
) -> Result<(), GateError> {
    let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
    drop(handshake);
    let tls = match accepted {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            stats.handshake_failed.fetch_add(1, Ordering::Relaxed);
            return Err(GateError::Handshake(e));
        }
        Err(_) => {
            stats.handshake_failed.fetch_add(1, Ordering::Relaxed);
            return Err(GateError::HandshakeTimeout);
        }
    };
    let peer = peer(&tls, cfg).inspect_err(|_| {
        stats.handshake_failed.fetch_add(1, Ordering::Relaxed);
    })?;
    if cfg.revocations.read().is_revoked(&peer.name, &peer.serial) {
        stats.revoked.fetch_add(1, Ordering::Relaxed);
        return Err(GateError::Revoked {
            role: peer.role,
            name: peer.name,
            serial: peer.serial,
        });
    }
    let acl = Acl::new(&cfg.fleet, &peer);
    let upstream = TcpStream::connect(cfg.upstream)
        .await
        .map_err(GateError::Upstream)?;
    let _ = upstream.set_nodelay(true);
    stats.accepted.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(%from, role = %peer.role, name = %peer.name, "gate: client authenticated");
    let (mut client_rx, mut client_tx) = tokio::io::split(tls);
    let (mut broker_rx, mut broker_tx) = upstream.into_split();
    let down = async {
        // The broker's packets go back as they are.
        let r = tokio::io::copy(&mut broker_rx, &mut client_tx).await;
        let _ = client_tx.shutdown().await;
        r.map(|_| ()).map_err(GateError::Io)
    };
    let up = async {
        let r = relay_checked(&mut client_rx, &mut broker_tx, &acl).await;
        let _ = broker_tx.shutdown().await;
        if let Err(GateError::Denied(d)) = &r {
            stats.denied.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%from, name = %peer.name, denied = %d, "gate: packet refused; connection closed");
        }
        r
    };
    // Whichever side ends first ends the connection.
    tokio::select! {
        r = down => r,
        r = up => r,
    }
}

/// The verified identity behind a TLS session.
fn peer(
    tls: &tokio_rustls::server::TlsStream<TcpStream>,
    cfg: &GateConfig,
) -> Result<PeerCert, GateError> {
    let (_, session) = tls.get_ref();
    let der = session
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or(GateError::NoCertificate)?;
    dai_trust::verify_peer_der(&cfg.ca_pem, der, SystemTime::now()).map_err(GateError::Certificate)
}

/// Frame the client's bytes into packets, check each, forward the ones
/// allowed byte for byte.
async fn relay_checked<R, W>(rx: &mut R, tx: &mut W, acl: &Acl) -> Result<(), GateError>
where
    R: AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut connected = false;
    let max = acl.max_packet();
    loop {
        let header = match mqttbytes::check(buf.iter(), max) {
            Ok(h) => h,
            // The fixed header announced more than this peer may send:
            // refused before the body is buffered.
            Err(mqttbytes::Error::PayloadSizeLimitExceeded(size)) => {
                return Err(GateError::Denied(acl.packet_too_large(size)));
            }
            Err(mqttbytes::Error::InsufficientBytes(_)) => {
                if rx.read_buf(&mut buf).await.map_err(GateError::Io)? == 0 {
                    return Ok(());
                }
                continue;
            }
            Err(e) => return Err(GateError::Mqtt(format!("{e:?}"))),
        };
        let frame = buf.split_to(header.frame_length());
        let packet =
            Packet::read(&mut frame.clone(), max).map_err(|e| GateError::Mqtt(format!("{e:?}")))?;
        check(acl, &packet, &mut connected)?;
        tx.write_all(&frame).await.map_err(GateError::Io)?;
    }
}

/// One packet against the ACL: CONNECT first (client id, last will),
/// then publishes and subscriptions.
fn check(acl: &Acl, packet: &Packet, connected: &mut bool) -> Result<(), GateError> {
    match packet {
        Packet::Connect(c) if !*connected => {
            acl.connect(&c.client_id).map_err(GateError::Denied)?;
            if let Some(will) = &c.last_will {
                acl.publish(&will.topic, will.message.len(), will.retain)
                    .map_err(GateError::Denied)?;
            }
            *connected = true;
            Ok(())
        }
        _ if !*connected => Err(GateError::NoConnect),
        Packet::Connect(_) => Err(GateError::Mqtt("a second CONNECT".into())),
        Packet::Publish(p) => acl
            .publish(&p.topic, p.payload.len(), p.retain)
            .map_err(GateError::Denied),
        Packet::Subscribe(s) => s
            .filters
            .iter()
            .try_for_each(|f| acl.subscribe(&f.path))
            .map_err(GateError::Denied),
        _ => Ok(()),
    }
}
