//! The daemon's YAML configuration (`configs/performance_config.yaml` and
//! its `DAI_*` overrides), parsed and validated.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = dai_config::Config::load(text, "fuzz", &[]);
    }
});
