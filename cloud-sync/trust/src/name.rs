//! Names that end up in certificates and MQTT topics: 1-64 characters of
//! `[A-Za-z0-9._-]` (the topic segment rule of `dai-protocol::topics`), so
//! no wildcard (`+`, `#`) or separator (`/`) can reach a topic or an ACL
//! pattern through a certificate.

use crate::TrustError;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Is `s` 1-64 characters of `[A-Za-z0-9._-]`?
pub fn valid(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(String);

        impl $ty {
            /// The name, if it follows the topic segment rule.
            pub fn parse(s: &str) -> Result<Self, TrustError> {
                if valid(s) {
                    Ok(Self(s.to_string()))
                } else {
                    Err(TrustError::InvalidName {
                        what: $what,
                        name: s.chars().take(80).collect(),
                    })
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(&self.0)
            }
        }

        impl std::str::FromStr for $ty {
            type Err = TrustError;
            fn from_str(s: &str) -> Result<Self, TrustError> {
                Self::parse(s)
            }
        }

        impl TryFrom<String> for $ty {
            type Error = TrustError;
            fn try_from(s: String) -> Result<Self, TrustError> {
                Self::parse(&s)
            }
        }

        impl From<$ty> for String {
            fn from(n: $ty) -> String {
                n.0
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// A device's name: its certificate CN, its MQTT client id and the
    /// `{device}` of its topics.
    DeviceName,
    "device"
);
name_type!(
    /// A fleet's name: the `{fleet}` of every topic and the organisation of
    /// the fleet CA.
    FleetName,
    "fleet"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_topic_segment_rule() {
        for ok in ["cam-1", "a", "A.b_c-9", &"x".repeat(64)] {
            assert!(DeviceName::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/b", "a+", "#", "dev 1", "é", "a\0", &"x".repeat(65)] {
            let e = DeviceName::parse(bad).expect_err(bad);
            assert!(e.to_string().starts_with("device name"), "{e}");
        }
        let e = FleetName::parse("lab/1").expect_err("slash");
        assert_eq!(
            e.to_string(),
            "fleet name \"lab/1\": expected 1-64 characters of [A-Za-z0-9._-]"
        );
    }

    #[test]
    fn the_rule_is_the_protocol_rule() {
        for s in [
            "cam-1",
            "",
            "a/b",
            "+",
            "#",
            "x.y_z",
            &"y".repeat(64),
            &"y".repeat(65),
            "ü",
        ] {
            assert_eq!(valid(s), dai_protocol::topics::valid_segment(s), "{s:?}");
        }
    }

    #[test]
    fn serde_refuses_invalid_names() {
        let n: DeviceName = serde_json::from_str("\"cam-1\"").expect("valid");
        assert_eq!(n.as_str(), "cam-1");
        assert!(serde_json::from_str::<DeviceName>("\"a/b\"").is_err());
    }
}
