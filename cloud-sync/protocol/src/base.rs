//! Which global an update's delta was computed against: its
//! `base_version` label, and the (epoch, version) order of globals.
//!
//! Labels: `"1.0.0"` is the shipped head of bundle version 1.0.0 (global 0,
//! the same in every epoch); `"1.0.0+g7@e1764660000123"` is global 7 of
//! aggregator epoch 1764660000123. Labels without `@e` (`"1.0.0+g7"`) come
//! from edges that predate epochs: their epoch is unknown.

use serde::{Deserialize, Serialize};

/// A global as an edge holds it: its aggregator epoch, then its version.
/// Ordered that way: a global of a newer epoch (a new version line, made
/// when an aggregator started from an empty state) replaces any of an
/// older one, whatever the version numbers; within an epoch the larger
/// version wins. `GlobalId::default()` is "none yet" (the shipped head).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct GlobalId {
    pub epoch: u64,
    pub version: u64,
}

/// A parsed `base_version` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Base {
    /// The global version (0: the shipped head).
    pub version: u64,
    /// The epoch of that global; `None` for the shipped head (valid in
    /// every epoch) and for labels from edges that predate epochs.
    pub epoch: Option<u64>,
}

/// The label of a delta against `global` of bundle version `bundle`
/// (`None`: against the shipped head).
pub fn label(bundle: &str, global: Option<GlobalId>) -> String {
    match global {
        Some(g) => format!("{bundle}+g{}@e{}", g.version, g.epoch),
        None => bundle.to_string(),
    }
}

/// Parse a `base_version` label; `None` when it is empty or its global
/// part is not `+g<version>[@e<epoch>]`.
pub fn parse(label: &str) -> Option<Base> {
    let Some((bundle, global)) = label.rsplit_once("+g") else {
        return (!label.is_empty()).then_some(Base {
            version: 0,
            epoch: None,
        });
    };
    if bundle.is_empty() {
        return None;
    }
    match global.split_once("@e") {
        Some((v, e)) => Some(Base {
            version: v.parse().ok()?,
            epoch: Some(e.parse().ok()?),
        }),
        None => Some(Base {
            version: global.parse().ok()?,
            epoch: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip_and_old_labels_still_parse() {
        let g = GlobalId {
            epoch: 1_764_660_000_123,
            version: 7,
        };
        let l = label("1.0.0", Some(g));
        assert_eq!(l, "1.0.0+g7@e1764660000123");
        assert_eq!(
            parse(&l),
            Some(Base {
                version: 7,
                epoch: Some(g.epoch)
            })
        );
        assert_eq!(
            parse("1.0.0"),
            Some(Base {
                version: 0,
                epoch: None
            })
        );
        assert_eq!(label("1.0.0", None), "1.0.0");
        assert_eq!(
            parse("1.0.0+g3"),
            Some(Base {
                version: 3,
                epoch: None
            })
        );
        for bad in ["", "+g3", "1.0.0+gx", "1.0.0+g3@e", "1.0.0+g3@ex", "1+g-1"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_newer_epoch_wins_over_a_larger_version() {
        let old = GlobalId {
            epoch: 10,
            version: 50,
        };
        let new = GlobalId {
            epoch: 11,
            version: 0,
        };
        assert!(new > old);
        assert!(
            GlobalId {
                epoch: 11,
                version: 1
            } > new
        );
        assert!(GlobalId::default() < new);
    }
}
