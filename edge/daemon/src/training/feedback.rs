//! Recent answers' head inputs, so `POST /v1/feedback {id, label}` (and a
//! label for a sensor window) becomes a training sample without running
//! the backbone again.
//!
//! Filled by the HTTP inference handler and the sensor pipelines, read by
//! the feedback endpoint; held by the [`Training`](super::Training) handle.

use std::collections::{HashMap, VecDeque};

/// One remembered answer: the model and version that produced it, and its
/// head input rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub model: String,
    pub version: String,
    pub features: Vec<f32>,
    pub rows: usize,
}

/// Bounded by entries and by bytes, oldest out first.
#[derive(Debug, Default)]
pub struct FeedbackCache {
    map: HashMap<String, Answer>,
    order: VecDeque<String>,
    floats: usize,
}

/// Answers kept.
pub const FEEDBACK_KEEP: usize = 10_000;
/// 64 MiB of f32 features at most.
const FEEDBACK_MAX_FLOATS: usize = 16 << 20;

impl FeedbackCache {
    pub fn put(&mut self, id: String, answer: Answer) {
        if answer.features.len() > FEEDBACK_MAX_FLOATS {
            return;
        }
        self.floats += answer.features.len();
        self.order.push_back(id.clone());
        if let Some(old) = self.map.insert(id, answer) {
            // A reused id replaces its entry; its floats no longer count.
            self.floats -= old.features.len();
        }
        while self.order.len() > FEEDBACK_KEEP || self.floats > FEEDBACK_MAX_FLOATS {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(e) = self.map.remove(&old) {
                self.floats -= e.features.len();
            }
        }
    }

    pub fn get(&self, id: &str) -> Option<&Answer> {
        self.map.get(id)
    }

    /// Remove and return an entry (its id stays in `order` until it ages out).
    pub fn take(&mut self, id: &str) -> Option<Answer> {
        let e = self.map.remove(id)?;
        self.floats -= e.features.len();
        Some(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(n: usize) -> Answer {
        Answer {
            model: "m".into(),
            version: "1".into(),
            features: vec![0.5; n],
            rows: 1,
        }
    }

    #[test]
    fn an_answer_is_taken_once() {
        let mut c = FeedbackCache::default();
        c.put("a".into(), answer(4));
        assert_eq!(c.get("a").map(|a| a.rows), Some(1));
        assert_eq!(c.take("a"), Some(answer(4)));
        assert_eq!(c.take("a"), None);
        assert_eq!(c.floats, 0);
    }

    #[test]
    fn bounded_by_entries_oldest_out_first() {
        let mut c = FeedbackCache::default();
        for i in 0..FEEDBACK_KEEP + 5 {
            c.put(format!("{i}"), answer(1));
        }
        assert!(c.get("0").is_none() && c.get("4").is_none());
        assert!(c.get("5").is_some());
        assert_eq!(c.floats, FEEDBACK_KEEP);
    }

    #[test]
    fn bounded_by_floats() {
        let mut c = FeedbackCache::default();
        c.put("big".into(), answer(FEEDBACK_MAX_FLOATS + 1));
        assert!(c.get("big").is_none(), "larger than the whole budget");
        c.put("a".into(), answer(FEEDBACK_MAX_FLOATS / 2 + 1));
        c.put("b".into(), answer(FEEDBACK_MAX_FLOATS / 2 + 1));
        assert!(c.get("a").is_none() && c.get("b").is_some());
    }
}
