//! Step 2 of loading: the range and cross-field rules of a parsed
//! [`Config`], one module per section of the file (`performance`: the
//! top-level knobs of the performance guide; `training`, `cloud`, `daemon`,
//! `http`, `sensors`: their sections). Last, `http` reads the token files
//! it names (a file that is no token is refused like a value).
//!
//! Every rule runs, so one run names every invalid key; more than one
//! problem is [`ConfigError::Many`]. Parsing cannot go past a key whose
//! value does not deserialize (a wrong type, an unknown enum value or key),
//! so [`parse_and_validate`] records that parse error, takes the key out of
//! the YAML tree (it then has its default) and parses again; the rules then
//! run on what parsed, leaving out the keys that were taken out (their
//! defaults say nothing about the file). A file with `MRU` as the eviction
//! policy and three values out of range names all four.

mod cloud;
mod daemon;
mod http;
mod performance;
mod sensors;
mod training;

use crate::{Config, ConfigError};
use serde_yaml_ng::Value;

/// Parse errors collected from one file at most; each one takes a key out
/// of the tree, so this only bounds a pathological file.
const MAX_PARSE_ERRORS: usize = 64;

/// The machine's core count (the bound of `cpu_limit`), when it is known;
/// like the worker count it honours CPU affinity and cgroup quotas.
pub(crate) fn machine_cores() -> Option<usize> {
    std::thread::available_parallelism().ok().map(|n| n.get())
}

/// Parse `tree` into a [`Config`] and check it, naming every problem found;
/// `cores` as in [`check`].
pub(crate) fn parse_and_validate(
    mut tree: Value,
    origin: &str,
    cores: Option<usize>,
) -> Result<Config, ConfigError> {
    let mut found = Vec::new();
    let mut taken_out: Vec<String> = Vec::new();
    let config = loop {
        match serde_path_to_error::deserialize::<_, Config>(tree.clone()) {
            Ok(config) => break Some(config),
            Err(e) => {
                let err = crate::parse_error(origin, e, &tree);
                let next = removable_key(&err);
                found.push(err);
                match next {
                    Some(key) if found.len() < MAX_PARSE_ERRORS && remove_key(&mut tree, &key) => {
                        taken_out.push(key)
                    }
                    // YAML that is not a mapping, or nothing left to take out.
                    _ => break None,
                }
            }
        }
    };
    let Some(mut config) = config else {
        return Err(one_or_many(found));
    };
    let mut p = Problems {
        origin,
        found: check(&config, origin, cores),
    };
    http::read_tokens(&mut p, &mut config.http);
    found.extend(p.found.into_iter().filter(|e| {
        !e.key()
            .is_some_and(|k| taken_out.iter().any(|t| is_under(k, t)))
    }));
    if found.is_empty() {
        Ok(config)
    } else {
        Err(one_or_many(found))
    }
}

/// Every rule of every section; `cores` is the machine's core count when
/// known (the bound of `cpu_limit`).
pub(crate) fn check(c: &Config, origin: &str, cores: Option<usize>) -> Vec<ConfigError> {
    let mut p = Problems {
        origin,
        found: Vec::new(),
    };
    sensors::check(&mut p, &c.sensors);
    performance::check(&mut p, c, cores);
    training::check(&mut p, &c.training);
    cloud::check(&mut p, &c.cloud);
    daemon::check(&mut p, &c.daemon);
    http::check(&mut p, &c.http, &c.daemon);
    p.found
}

/// The problems of one file, in the order the rules found them.
pub(crate) struct Problems<'a> {
    origin: &'a str,
    found: Vec<ConfigError>,
}

impl Problems<'_> {
    /// Record `key` = `value` as refused unless `ok`; `allowed` says what is.
    fn check(&mut self, ok: bool, key: &str, value: impl std::fmt::Display, allowed: &str) {
        if !ok {
            self.invalid(key, value.to_string(), allowed);
        }
    }

    fn invalid(&mut self, key: &str, value: String, allowed: &str) {
        self.found.push(ConfigError::Invalid {
            origin: self.origin.to_string(),
            key: key.to_string(),
            value,
            allowed: allowed.to_string(),
        });
    }
}

/// The entries of [`ConfigError::Many`], one per line.
pub(crate) fn lines(found: &[ConfigError]) -> String {
    found.iter().map(|e| format!("\n  {e}")).collect()
}

/// A positive, finite number.
fn finite_pos(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

fn one_or_many(mut found: Vec<ConfigError>) -> ConfigError {
    if found.len() == 1 {
        found.remove(0)
    } else {
        ConfigError::Many(found)
    }
}

/// The key to take out of the tree after a parse error, if parsing can go on.
fn removable_key(err: &ConfigError) -> Option<String> {
    // The path is the key's own, an unknown key's too (`daemon.port`).
    let ConfigError::Parse { key, .. } = err else {
        return None;
    };
    // Inside a list (`sensors[1].rate_hz`) taking out an entry would shift
    // the indices of the entries after it: take out the whole list.
    let key = match key.find('[') {
        Some(i) => &key[..i],
        None => key,
    };
    (!key.is_empty() && key != ".").then(|| key.to_string())
}

/// Remove the mapping entry at dotted `key`; whether there was one.
fn remove_key(tree: &mut Value, key: &str) -> bool {
    let mut node = tree;
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        let Some(map) = node.as_mapping_mut() else {
            return false;
        };
        if parts.peek().is_none() {
            return map.remove(part).is_some();
        }
        match map.get_mut(part) {
            Some(child) => node = child,
            None => return false,
        }
    }
    false
}

/// `key` is `prefix` or inside it (`cloud.fleet` under `cloud`,
/// `sensors[0].name` under `sensors`).
fn is_under(key: &str, prefix: &str) -> bool {
    key.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
}

#[cfg(test)]
mod tests;
