//! The topic ACL of the embedded broker's gate, the same rules as the
//! shipped Mosquitto ACL (`deploy/mosquitto/acl`). Pure: a peer (from its
//! verified certificate) and a packet's client id, topic or filter in, a
//! verdict out.
//!
//! - A device `N` connects with client id `N`; it may publish only on
//!   `dai/v1/{fleet}/dev/N/{update,status,event,want}` (its last will is
//!   its status) and subscribe only to `dai/v1/{fleet}/dev/N/ack` and
//!   `dai/v1/{fleet}/model/{M|+}/global`.
//! - The aggregator (certificate name `dai-cloud`) connects with a client
//!   id `dai-cloud` or `dai-cloud-…`; it may publish acks and globals of
//!   the fleet and subscribe to every device's update, status, event and
//!   want topic and to the globals.
//! - A broker certificate is not a client.
//! - Every message, the last will included, keeps to its topic's size and
//!   retain rules ([`dai_protocol::limits`]): only a status or a global is
//!   retained, so one device can make the broker hold at most its four
//!   topics' bounds, and a packet larger than anything its role may send
//!   is refused from its fixed header, before it is buffered.

use dai_protocol::limits;
use dai_protocol::topics::{PREFIX, Topic, valid_segment};
use dai_trust::{PeerCert, Role};

/// Why a packet was refused (the gate closes the connection).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("client id {client_id:?} is not the certificate's name {name:?}")]
    ClientId { client_id: String, name: String },
    #[error("{role} {name:?} may not publish on {topic:?}")]
    Publish {
        role: Role,
        name: String,
        topic: String,
    },
    #[error("{role} {name:?} may not subscribe to {filter:?}")]
    Subscribe {
        role: Role,
        name: String,
        filter: String,
    },
    #[error("a {0} certificate cannot connect as an MQTT client")]
    Role(Role),
    #[error("{name:?}: a {size}-byte message on {topic:?}, over its {limit}-byte bound")]
    TooLarge {
        name: String,
        topic: String,
        size: usize,
        limit: usize,
    },
    #[error("{name:?}: a {size}-byte packet, over the {limit} bytes a {role} may send")]
    Packet {
        role: Role,
        name: String,
        size: usize,
        limit: usize,
    },
    #[error(
        "{name:?} may not retain a message on {topic:?} (only a status or a global is retained)"
    )]
    Retain { name: String, topic: String },
}

/// The rules for one authenticated peer in one fleet.
#[derive(Debug, Clone)]
pub struct Acl {
    fleet: String,
    role: Role,
    name: String,
}

impl Acl {
    pub fn new(fleet: &str, peer: &PeerCert) -> Acl {
        Acl {
            fleet: fleet.to_string(),
            role: peer.role,
            name: peer.name.clone(),
        }
    }

    /// The CONNECT: the client id must be the certificate's name (the
    /// aggregator's may carry a per-process suffix).
    pub fn connect(&self, client_id: &str) -> Result<(), Denied> {
        let ok = match self.role {
            Role::Device => client_id == self.name,
            Role::Aggregator => {
                client_id == self.name
                    || client_id
                        .strip_prefix(self.name.as_str())
                        .and_then(|rest| rest.strip_prefix('-'))
                        .is_some_and(valid_segment)
            }
            Role::Broker => return Err(Denied::Role(Role::Broker)),
        };
        if ok {
            Ok(())
        } else {
            Err(Denied::ClientId {
                client_id: client_id.chars().take(80).collect(),
                name: self.name.clone(),
            })
        }
    }

    /// A PUBLISH (or the last will) of `size` payload bytes.
    pub fn publish(&self, topic: &str, size: usize, retain: bool) -> Result<(), Denied> {
        let parsed = Topic::parse(topic);
        let ok = match (self.role, &parsed) {
            (
                Role::Device,
                Ok(
                    Topic::Update { fleet, device }
                    | Topic::Status { fleet, device }
                    | Topic::Event { fleet, device }
                    | Topic::Want { fleet, device }
                    | Topic::Fetch { fleet, device }
                    | Topic::Report { fleet, device }
                    // A tier is enrolled like a device; whether its
                    // partials count is the root's `--tier` list.
                    | Topic::Partial { fleet, device },
                ),
            ) => *fleet == self.fleet && *device == self.name,
            (
                Role::Aggregator,
                Ok(
                    Topic::Ack { fleet, .. }
                    | Topic::Global { fleet, .. }
                    | Topic::Bundle { fleet, .. }
                    | Topic::Chunk { fleet, .. },
                ),
            ) => *fleet == self.fleet,
            _ => false,
        };
        let shown = || topic.chars().take(200).collect::<String>();
        let parsed = match parsed {
            Ok(t) if ok => t,
            _ => {
                return Err(Denied::Publish {
                    role: self.role,
                    name: self.name.clone(),
                    topic: shown(),
                });
            }
        };
        let limit = limits::max_payload(&parsed);
        if size > limit {
            return Err(Denied::TooLarge {
                name: self.name.clone(),
                topic: shown(),
                size,
                limit,
            });
        }
        if retain && !limits::may_retain(&parsed) {
            return Err(Denied::Retain {
                name: self.name.clone(),
                topic: shown(),
            });
        }
        Ok(())
    }

    /// The largest MQTT packet this peer may send: its largest topic's
    /// payload plus room for the topic and headers. The gate reads the
    /// fixed header first and refuses a larger packet before buffering it.
    pub fn max_packet(&self) -> usize {
        const ROOM: usize = 1024;
        let largest = match self.role {
            Role::Device => limits::MAX_UPDATE_BYTES
                .max(limits::MAX_STATUS_BYTES)
                .max(limits::MAX_EVENT_BYTES),
            Role::Aggregator => limits::MAX_GLOBAL_BYTES.max(limits::MAX_ACK_BYTES),
            Role::Broker => 0,
        };
        largest + ROOM
    }

    /// The refusal of a packet of `size` bytes, over [`Acl::max_packet`].
    pub fn packet_too_large(&self, size: usize) -> Denied {
        Denied::Packet {
            role: self.role,
            name: self.name.clone(),
            size,
            limit: self.max_packet(),
        }
    }

    /// One SUBSCRIBE filter.
    pub fn subscribe(&self, filter: &str) -> Result<(), Denied> {
        if self.subscribe_ok(filter) {
            Ok(())
        } else {
            Err(Denied::Subscribe {
                role: self.role,
                name: self.name.clone(),
                filter: filter.chars().take(200).collect(),
            })
        }
    }

    fn subscribe_ok(&self, filter: &str) -> bool {
        let Some(rest) = filter
            .strip_prefix(PREFIX)
            .and_then(|r| r.strip_prefix('/'))
        else {
            return false;
        };
        let parts: Vec<&str> = rest.split('/').collect();
        // A segment is a name or, where allowed, the single-level wildcard.
        let name_or_plus = |s: &str| s == "+" || valid_segment(s);
        match (self.role, parts.as_slice()) {
            (_, [fleet, "model", model, "global" | "bundle"]) => {
                *fleet == self.fleet && name_or_plus(model)
            }
            (Role::Device, [fleet, "dev", device, "ack" | "chunk"]) => {
                *fleet == self.fleet && *device == self.name
            }
            (Role::Aggregator, [fleet, "dev", device, leaf]) => {
                *fleet == self.fleet
                    && name_or_plus(device)
                    && matches!(
                        *leaf,
                        "update" | "status" | "event" | "want" | "fetch" | "report" | "partial"
                    )
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dai_trust::{FleetName, Serial};

    fn peer(role: Role, name: &str) -> PeerCert {
        PeerCert {
            role,
            fleet: FleetName::parse("f").expect("fleet"),
            name: name.into(),
            serial: Serial::from_der_bytes(&[1]),
            public_key: [0; 32],
            not_before: 0,
            not_after: i64::MAX,
        }
    }

    #[test]
    fn a_device_speaks_only_for_itself() {
        let a = Acl::new("f", &peer(Role::Device, "a"));
        assert!(a.connect("a").is_ok());
        for id in ["b", "dai-cloud", "a-2", ""] {
            assert!(a.connect(id).is_err(), "{id}");
        }
        for t in ["update", "status", "event", "want", "fetch", "report"] {
            assert!(
                a.publish(&format!("dai/v1/f/dev/a/{t}"), 10, false).is_ok(),
                "{t}"
            );
            assert!(
                a.publish(&format!("dai/v1/f/dev/b/{t}"), 10, false)
                    .is_err(),
                "{t}"
            );
            assert!(
                a.publish(&format!("dai/v1/g/dev/a/{t}"), 10, false)
                    .is_err(),
                "{t}"
            );
        }
        for t in [
            "dai/v1/f/dev/a/ack",
            "dai/v1/f/dev/b/ack",
            "dai/v1/f/model/m/global",
            "dai/v1/f/model/m/bundle",
            "dai/v1/f/dev/a/chunk",
            "dai/v1/f/dev/b/chunk",
            "dai/v1/f/dev/a/other",
            "x",
        ] {
            assert!(a.publish(t, 10, false).is_err(), "{t}");
        }
        for ok in [
            "dai/v1/f/dev/a/ack",
            "dai/v1/f/dev/a/chunk",
            "dai/v1/f/model/m/global",
            "dai/v1/f/model/+/global",
            "dai/v1/f/model/+/bundle",
        ] {
            assert!(a.subscribe(ok).is_ok(), "{ok}");
        }
        for bad in [
            "#",
            "dai/#",
            "dai/v1/f/#",
            "dai/v1/f/dev/+/update",
            "dai/v1/f/dev/b/update",
            "dai/v1/f/dev/b/ack",
            "dai/v1/f/dev/+/ack",
            "dai/v1/f/dev/b/chunk",
            "dai/v1/f/dev/+/chunk",
            "dai/v1/f/dev/+/fetch",
            "dai/v1/f/dev/a/update",
            "dai/v1/f/model/#",
            "dai/v1/g/model/m/global",
            "dai/v1/+/model/m/global",
            "$SYS/#",
        ] {
            assert!(a.subscribe(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_aggregator_reads_devices_and_writes_acks_and_globals() {
        let c = Acl::new("f", &peer(Role::Aggregator, "dai-cloud"));
        assert!(c.connect("dai-cloud").is_ok());
        assert!(c.connect("dai-cloud-1f2e").is_ok());
        assert!(c.connect("a").is_err());
        assert!(c.connect("dai-cloud-").is_err());
        assert!(c.connect("dai-cloud-a/b").is_err());
        assert!(c.publish("dai/v1/f/dev/a/ack", 10, false).is_ok());
        assert!(c.publish("dai/v1/f/model/m/global", 10, false).is_ok());
        assert!(c.publish("dai/v1/f/dev/a/update", 10, false).is_err());
        assert!(c.publish("dai/v1/g/dev/a/ack", 10, false).is_err());
        for ok in [
            "dai/v1/f/dev/+/update",
            "dai/v1/f/dev/+/status",
            "dai/v1/f/dev/+/want",
            "dai/v1/f/dev/a/event",
            "dai/v1/f/model/+/global",
        ] {
            assert!(c.subscribe(ok).is_ok(), "{ok}");
        }
        for bad in ["#", "dai/v1/f/dev/+/ack", "dai/v1/g/dev/+/update"] {
            assert!(c.subscribe(bad).is_err(), "{bad}");
        }
        assert!(c.publish("dai/v1/f/model/m/global", 10, true).is_ok());
        let b = Acl::new("f", &peer(Role::Broker, "broker"));
        assert!(b.connect("broker").is_err());
    }

    #[test]
    fn sizes_and_retain_keep_to_the_topic() {
        let a = Acl::new("f", &peer(Role::Device, "a"));
        let t = |leaf: &str| format!("dai/v1/f/dev/a/{leaf}");
        // The attack: a maximal retained message on each of its topics.
        for leaf in ["update", "event", "want"] {
            assert!(matches!(
                a.publish(&t(leaf), 100, true),
                Err(Denied::Retain { .. })
            ));
        }
        assert!(a.publish(&t("status"), 100, true).is_ok());
        assert!(matches!(
            a.publish(&t("status"), 16 << 20, true),
            Err(Denied::TooLarge { .. })
        ));
        assert!(
            a.publish(&t("update"), limits::MAX_UPDATE_BYTES, false)
                .is_ok()
        );
        assert!(matches!(
            a.publish(&t("update"), limits::MAX_UPDATE_BYTES + 1, false),
            Err(Denied::TooLarge { .. })
        ));
        assert!(matches!(
            a.publish(&t("want"), 2048, false),
            Err(Denied::TooLarge { .. })
        ));
        // A device's packets stop at its update bound; the aggregator's
        // reach a global.
        assert!(a.max_packet() > limits::MAX_UPDATE_BYTES);
        assert!(a.max_packet() < 16 << 20);
        let c = Acl::new("f", &peer(Role::Aggregator, "dai-cloud"));
        assert!(c.max_packet() > limits::MAX_GLOBAL_BYTES);
        assert!(c.max_packet() <= super::super::MAX_PACKET);
        assert!(matches!(
            c.publish("dai/v1/f/dev/a/ack", 100, true),
            Err(Denied::Retain { .. })
        ));
        assert!(matches!(
            c.publish("dai/v1/f/dev/a/ack", 1 << 20, false),
            Err(Denied::TooLarge { .. })
        ));
    }
}
