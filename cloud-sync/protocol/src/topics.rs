//! MQTT topics. Segments (fleet, device, model) are 1-64 characters of
//! `[A-Za-z0-9._-]`, so no wildcard or separator can sneak in.

use crate::ProtocolError;

pub const PREFIX: &str = "dai/v1";

/// A parsed topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topic {
    Update {
        fleet: String,
        device: String,
    },
    Ack {
        fleet: String,
        device: String,
    },
    Status {
        fleet: String,
        device: String,
    },
    /// Sensor pipeline events (predictions), JSON, not retained.
    Event {
        fleet: String,
        device: String,
    },
    /// A device asks for the current global of a model
    /// ([`crate::messages::Want`]); answered only with a newer one.
    Want {
        fleet: String,
        device: String,
    },
    Global {
        fleet: String,
        model: String,
    },
    /// The aggregator's signed offer of a model bundle
    /// ([`crate::bundle::Offer`]), retained.
    Bundle {
        fleet: String,
        model: String,
    },
    /// A device asks for chunks of an offered bundle
    /// ([`crate::bundle::Fetch`]).
    Fetch {
        fleet: String,
        device: String,
    },
    /// Chunks for one device ([`crate::bundle::Chunk`]).
    Chunk {
        fleet: String,
        device: String,
    },
    /// A device's state of a bundle ([`crate::bundle::Report`]).
    Report {
        fleet: String,
        device: String,
    },
    /// A tier's partial aggregate ([`crate::partial`]); `device` is the
    /// tier's enrolled name, its acks come on its `ack` topic.
    Partial {
        fleet: String,
        device: String,
    },
}

/// Is `s` a valid topic segment?
pub fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn check(kind: &str, s: &str) -> Result<(), ProtocolError> {
    if valid_segment(s) {
        Ok(())
    } else {
        Err(ProtocolError::Topic {
            topic: s.to_string(),
            reason: format!("{kind} must be 1-64 characters of [A-Za-z0-9._-]"),
        })
    }
}

impl Topic {
    /// The topic string; fails if a segment is invalid.
    pub fn build(&self) -> Result<String, ProtocolError> {
        Ok(match self {
            Topic::Update { fleet, device }
            | Topic::Ack { fleet, device }
            | Topic::Status { fleet, device }
            | Topic::Event { fleet, device }
            | Topic::Want { fleet, device }
            | Topic::Fetch { fleet, device }
            | Topic::Chunk { fleet, device }
            | Topic::Report { fleet, device }
            | Topic::Partial { fleet, device } => {
                check("fleet", fleet)?;
                check("device", device)?;
                let leaf = match self {
                    Topic::Update { .. } => "update",
                    Topic::Ack { .. } => "ack",
                    Topic::Event { .. } => "event",
                    Topic::Want { .. } => "want",
                    Topic::Fetch { .. } => "fetch",
                    Topic::Chunk { .. } => "chunk",
                    Topic::Report { .. } => "report",
                    Topic::Partial { .. } => "partial",
                    _ => "status",
                };
                format!("{PREFIX}/{fleet}/dev/{device}/{leaf}")
            }
            Topic::Global { fleet, model } => {
                check("fleet", fleet)?;
                check("model", model)?;
                format!("{PREFIX}/{fleet}/model/{model}/global")
            }
            Topic::Bundle { fleet, model } => {
                check("fleet", fleet)?;
                check("model", model)?;
                format!("{PREFIX}/{fleet}/model/{model}/bundle")
            }
        })
    }

    /// Parse a topic string.
    pub fn parse(topic: &str) -> Result<Topic, ProtocolError> {
        let bad = |reason: &str| ProtocolError::Topic {
            topic: topic.to_string(),
            reason: reason.to_string(),
        };
        let rest = topic
            .strip_prefix(PREFIX)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| bad("expected the dai/v1/ prefix"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let t = match parts.as_slice() {
            [fleet, "dev", device, leaf] => {
                let (fleet, device) = (fleet.to_string(), device.to_string());
                match *leaf {
                    "update" => Topic::Update { fleet, device },
                    "ack" => Topic::Ack { fleet, device },
                    "status" => Topic::Status { fleet, device },
                    "event" => Topic::Event { fleet, device },
                    "want" => Topic::Want { fleet, device },
                    "fetch" => Topic::Fetch { fleet, device },
                    "chunk" => Topic::Chunk { fleet, device },
                    "report" => Topic::Report { fleet, device },
                    "partial" => Topic::Partial { fleet, device },
                    _ => {
                        return Err(bad(
                            "expected update, ack, status, event, want, fetch, chunk, report or partial after dev/{device}",
                        ));
                    }
                }
            }
            [fleet, "model", model, "global"] => Topic::Global {
                fleet: fleet.to_string(),
                model: model.to_string(),
            },
            [fleet, "model", model, "bundle"] => Topic::Bundle {
                fleet: fleet.to_string(),
                model: model.to_string(),
            },
            _ => {
                return Err(bad(
                    "expected {fleet}/dev/{device}/{update|ack|status|event|want|fetch|chunk|report|partial} or {fleet}/model/{model}/{global|bundle}",
                ));
            }
        };
        // Re-building validates every segment.
        t.build()
            .map_err(|_| bad("a segment is not 1-64 characters of [A-Za-z0-9._-]"))?;
        Ok(t)
    }
}

/// Subscription filters.
pub fn all_updates(fleet: &str) -> String {
    format!("{PREFIX}/{fleet}/dev/+/update")
}

pub fn all_status(fleet: &str) -> String {
    format!("{PREFIX}/{fleet}/dev/+/status")
}

pub fn all_wants(fleet: &str) -> String {
    format!("{PREFIX}/{fleet}/dev/+/want")
}

pub fn all_globals(fleet: &str) -> String {
    format!("{PREFIX}/{fleet}/model/+/global")
}

pub fn all_bundles(fleet: &str) -> String {
    format!("{PREFIX}/{fleet}/model/+/bundle")
}

pub fn all_fetches(fleet: &str) -> String {
    format!("{PREFIX}/{fleet}/dev/+/fetch")
}

pub fn all_partials(fleet: &str) -> String {
    format!("{PREFIX}/{fleet}/dev/+/partial")
}

pub fn all_reports(fleet: &str) -> String {
    format!("{PREFIX}/{fleet}/dev/+/report")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_and_parse_round_trip() {
        for t in [
            Topic::Update {
                fleet: "lab".into(),
                device: "cam-01".into(),
            },
            Topic::Ack {
                fleet: "lab".into(),
                device: "cam-01".into(),
            },
            Topic::Status {
                fleet: "lab".into(),
                device: "gw.2".into(),
            },
            Topic::Global {
                fleet: "lab".into(),
                model: "digits".into(),
            },
            Topic::Want {
                fleet: "lab".into(),
                device: "cam-01".into(),
            },
            Topic::Bundle {
                fleet: "lab".into(),
                model: "ocr".into(),
            },
            Topic::Fetch {
                fleet: "lab".into(),
                device: "cam-01".into(),
            },
            Topic::Chunk {
                fleet: "lab".into(),
                device: "cam-01".into(),
            },
            Topic::Report {
                fleet: "lab".into(),
                device: "cam-01".into(),
            },
        ] {
            let s = t.build().expect("build");
            assert_eq!(Topic::parse(&s).expect("parse"), t);
        }
        assert_eq!(
            Topic::Update {
                fleet: "f".into(),
                device: "d".into()
            }
            .build()
            .expect("b"),
            "dai/v1/f/dev/d/update"
        );
    }

    #[test]
    fn refuses_wildcards_and_junk() {
        assert!(
            Topic::Update {
                fleet: "a/b".into(),
                device: "d".into()
            }
            .build()
            .is_err()
        );
        assert!(
            Topic::Update {
                fleet: "f".into(),
                device: "+".into()
            }
            .build()
            .is_err()
        );
        for bad in [
            "dai/v2/f/dev/d/update",
            "dai/v1/f/dev/d/other",
            "dai/v1/f/model/m",
            "x",
            "dai/v1/f/dev/#/update",
        ] {
            assert!(Topic::parse(bad).is_err(), "{bad}");
        }
    }
}
