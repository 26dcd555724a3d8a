//! The `sensors:` list: each entry's own rules (`SensorConfig::validate`,
//! one problem per entry) and unique names (they label metrics and events).

use super::Problems;
use dai_sensors::config::SensorConfig;

pub(super) fn check(p: &mut Problems<'_>, sensors: &[SensorConfig]) {
    let mut names = std::collections::HashSet::new();
    for (i, s) in sensors.iter().enumerate() {
        if let Err(e) = s.validate() {
            p.invalid(&format!("sensors[{i}]"), s.name.clone(), &e.to_string());
        }
        if !names.insert(s.name.as_str()) {
            p.invalid(
                &format!("sensors[{i}].name"),
                s.name.clone(),
                "sensor names must be unique",
            );
        }
    }
}
