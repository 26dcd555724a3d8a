//! A progress bar on stderr for long loops (calibration, verification,
//! timing). Drawn only when stderr is a terminal, so logs and `--json`
//! output stay clean; at most ~10 redraws a second.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Progress {
    label: String,
    total: usize,
    done: usize,
    draw: bool,
    last: Option<Instant>,
    start: Instant,
}

impl Progress {
    pub fn new(label: &str, total: usize) -> Progress {
        Progress {
            label: label.to_string(),
            total: total.max(1),
            done: 0,
            draw: std::io::stderr().is_terminal(),
            last: None,
            start: Instant::now(),
        }
    }

    pub fn inc(&mut self) {
        self.done += 1;
        if !self.draw {
            return;
        }
        let now = Instant::now();
        if self.done < self.total
            && self
                .last
                .is_some_and(|l| now.duration_since(l) < Duration::from_millis(100))
        {
            return;
        }
        self.last = Some(now);
        let width = 30;
        let filled = width * self.done.min(self.total) / self.total;
        let _ = write!(
            std::io::stderr(),
            "\r{:<24} [{}{}] {}/{} {:.1}s",
            self.label,
            "#".repeat(filled),
            ".".repeat(width - filled),
            self.done,
            self.total,
            self.start.elapsed().as_secs_f64()
        );
    }

    pub fn finish(self) {
        if self.draw {
            let _ = writeln!(std::io::stderr());
        }
    }
}
