//! Flower's strategies as a round combiner (bench/flower_strategies.py,
//! one Python process answering a JSON line per round), for the
//! benchmarks that run Flower side by side with us on the same client
//! updates.

use super::poison::Submission;
use super::repo;
use dai_train::Head;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

pub struct Flower {
    _child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Flower {
    /// `None` when python3 cannot be started.
    pub fn start() -> Option<Flower> {
        let mut child = Command::new("python3")
            .arg(repo().join("bench/flower_strategies.py"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let stdin = child.stdin.take()?;
        let stdout = BufReader::new(child.stdout.take()?);
        Some(Flower {
            _child: child,
            stdin,
            stdout,
        })
    }

    /// One round of `strategy`; `Err` when the strategy refuses (Bulyan
    /// with too many attackers for its assumption).
    pub fn round(
        &mut self,
        strategy: &str,
        f: usize,
        global: &Head,
        subs: &[Submission],
        extra: serde_json::Value,
    ) -> Result<Head, String> {
        let names: Vec<String> = subs[0].tensors.iter().map(|t| t.name.clone()).collect();
        let named = dai_head::layout::named(&global.spec, &global.params);
        let g: Vec<Vec<f32>> = names
            .iter()
            .map(|n| {
                named
                    .iter()
                    .find(|t| &t.name() == n)
                    .map(|t| t.values.to_vec())
                    .expect("tensor")
            })
            .collect();
        let deltas: Vec<Vec<Vec<f32>>> = subs
            .iter()
            .map(|s| s.tensors.iter().map(|t| t.values.clone()).collect())
            .collect();
        let mut req = serde_json::json!({
            "strategy": strategy,
            "f": f,
            "global": g,
            "deltas": deltas,
            "num_examples": subs.iter().map(|s| s.samples).collect::<Vec<_>>(),
        });
        if let (Some(r), Some(e)) = (req.as_object_mut(), extra.as_object()) {
            r.extend(e.clone());
        }
        writeln!(self.stdin, "{req}").expect("to flower");
        self.stdin.flush().expect("flush");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("from flower");
        let v: serde_json::Value = serde_json::from_str(&line).expect("json");
        if let Some(e) = v["error"].as_str() {
            return Err(e.to_string());
        }
        let mut head = global.clone();
        for (name, t) in names.iter().zip(v["global"].as_array().expect("global")) {
            let values: Vec<f32> = t
                .as_array()
                .expect("tensor")
                .iter()
                .map(|x| x.as_f64().unwrap_or(f64::NAN) as f32)
                .collect();
            dai_head::layout::set(&head.spec, &mut head.params, name, values).expect("set");
        }
        Ok(head)
    }
}
