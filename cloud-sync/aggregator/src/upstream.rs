//! A tier's second MQTT session: to the upstream (root's) broker, with the
//! tier's enrolled identity (mutual TLS), beside its own broker session.
//! Carries the tier's signed partial aggregates up and the root's acks and
//! globals down ([`crate::intake::tier`] decides; this only moves bytes).
//!
//! A clean session, like the service's own: what matters survives in the
//! state file's outbox, which the intake sends again on every CONNACK, and
//! the root answers a repeated partial as a duplicate, so an ack lost while
//! the link was down costs one more copy, never a second count.

use crate::intake::tier::TierConfig;
use crate::service::{BrokerAddr, Outgoing, Pumped, spawn_event_pump};
use rumqttc::{AsyncClient, MqttOptions, QoS, TlsConfiguration, Transport};
use std::sync::Arc;
use std::time::Duration;

/// Where and as whom a tier connects upstream.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub broker: BrokerAddr,
    /// Mutual TLS with the tier's identity bundle; `None`: plain TCP
    /// (`--insecure-plaintext` only).
    pub tls: Option<Arc<dai_trust::tls::ClientConfig>>,
    pub client_id: String,
    pub tier: TierConfig,
}

/// Partial aggregates waiting for the upstream publishing task.
const UPSTREAM_CAPACITY: usize = 256;

/// The running link: its client, its events and its publishing queue.
pub(crate) struct Link {
    pub client: AsyncClient,
    pub events: tokio::sync::mpsc::Receiver<Pumped>,
    pub out: tokio::sync::mpsc::Sender<Outgoing>,
    pump: tokio::task::JoinHandle<()>,
    publisher: tokio::task::JoinHandle<()>,
}

impl Link {
    pub fn start(cfg: &UpstreamConfig) -> Link {
        let mut opts = MqttOptions::new(&cfg.client_id, &cfg.broker.host, cfg.broker.port);
        opts.set_keep_alive(Duration::from_secs(10));
        opts.set_clean_session(true);
        if let Some(tls) = &cfg.tls {
            opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                tls.clone(),
            )));
        }
        opts.set_max_packet_size(16 << 20, 16 << 20);
        let (client, events) = AsyncClient::new(opts, 64);
        let (events, pump) = spawn_event_pump(events);
        let (out, mut rx) = tokio::sync::mpsc::channel::<Outgoing>(UPSTREAM_CAPACITY);
        let publisher = client.clone();
        // Its own task, for the reason the service's publisher has one:
        // `publish` waits on rumqttc's queue, which only the pump drains.
        let publisher = tokio::spawn(async move {
            while let Some(o) = rx.recv().await {
                if let Err(e) = publisher
                    .publish(o.topic, QoS::AtLeastOnce, o.retain, o.payload)
                    .await
                {
                    tracing::error!(error = %e, "upstream message not queued");
                }
            }
        });
        Link {
            client,
            events,
            out,
            pump,
            publisher,
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.publisher.abort();
        self.pump.abort();
    }
}

/// The next upstream event, or never without a link (for `select!`).
pub(crate) async fn next(link: &mut Option<Link>) -> Option<Pumped> {
    match link {
        Some(l) => l.events.recv().await,
        None => std::future::pending().await,
    }
}
