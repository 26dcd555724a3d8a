//! End-to-end tests of the edge daemon: the real zoo models (fetched and
//! verified on first use), the daemon in-process on 127.0.0.1:0, a real
//! SQLite file in a temp dir, HTTP through reqwest.

mod bad_input;
mod browser;
mod cache_and_balancing;
mod cloud;
mod config;
mod crate_graph;
mod demo;
mod deploy;
mod disk_faults;
mod epochs;
mod http_auth;
mod inference;
mod lifecycle;
mod memory_bound;
mod metrics;
mod model_publish;
mod model_upload;
mod mosquitto_acl;
mod mosquitto_takeover;
mod nemesis;
mod netns;
mod partition;
mod power_loss;
mod profiling;
mod robustness;
mod sensors;
mod support;
mod training;
mod variants;
