//! The pprof profile format (`profile.proto` of google/pprof, the fields
//! a CPU profile uses) as prost messages, and the encoding of a pprof-rs
//! report into it: one location per function (pprof-rs gives resolved
//! symbols, not addresses), two sample values (`samples/count`,
//! `cpu/nanoseconds`) and a `thread` label, as pprof-rs's own codec does.

use prost::Message;
use std::collections::HashMap;

#[derive(Clone, PartialEq, Message)]
pub struct Profile {
    #[prost(message, repeated, tag = "1")]
    pub sample_type: Vec<ValueType>,
    #[prost(message, repeated, tag = "2")]
    pub sample: Vec<Sample>,
    #[prost(message, repeated, tag = "4")]
    pub location: Vec<Location>,
    #[prost(message, repeated, tag = "5")]
    pub function: Vec<Function>,
    #[prost(string, repeated, tag = "6")]
    pub string_table: Vec<String>,
    #[prost(int64, tag = "9")]
    pub time_nanos: i64,
    #[prost(int64, tag = "10")]
    pub duration_nanos: i64,
    #[prost(message, optional, tag = "11")]
    pub period_type: Option<ValueType>,
    #[prost(int64, tag = "12")]
    pub period: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct ValueType {
    #[prost(int64, tag = "1")]
    pub r#type: i64,
    #[prost(int64, tag = "2")]
    pub unit: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct Sample {
    #[prost(uint64, repeated, tag = "1")]
    pub location_id: Vec<u64>,
    #[prost(int64, repeated, tag = "2")]
    pub value: Vec<i64>,
    #[prost(message, repeated, tag = "3")]
    pub label: Vec<Label>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Label {
    #[prost(int64, tag = "1")]
    pub key: i64,
    #[prost(int64, tag = "2")]
    pub str: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct Location {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(message, repeated, tag = "4")]
    pub line: Vec<Line>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Line {
    #[prost(uint64, tag = "1")]
    pub function_id: u64,
    #[prost(int64, tag = "2")]
    pub line: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct Function {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(int64, tag = "2")]
    pub name: i64,
    #[prost(int64, tag = "3")]
    pub system_name: i64,
    #[prost(int64, tag = "4")]
    pub filename: i64,
}

/// Strings by first use; index 0 is "" as the format requires.
#[derive(Default)]
struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn new() -> Strings {
        let mut s = Strings::default();
        s.id("");
        s
    }

    fn id(&mut self, v: &str) -> i64 {
        if let Some(&i) = self.index.get(v) {
            return i;
        }
        let i = self.table.len() as i64;
        self.table.push(v.to_string());
        self.index.insert(v.to_string(), i);
        i
    }
}

/// `report` as a pprof profile.
pub fn profile(report: &pprof::Report) -> Profile {
    let mut s = Strings::new();
    let mut functions: HashMap<String, u64> = HashMap::new();
    let (mut function, mut location, mut sample) = (Vec::new(), Vec::new(), Vec::new());
    let freq = i64::from(report.timing.frequency.max(1));
    let thread = s.id("thread");
    for (frames, &count) in &report.data {
        let mut ids = Vec::new();
        for symbol in frames.frames.iter().flatten() {
            let name = symbol.name();
            let id = match functions.get(&name) {
                Some(&id) => id,
                None => {
                    let id = function.len() as u64 + 1;
                    function.push(Function {
                        id,
                        name: s.id(&name),
                        system_name: s.id(&symbol.sys_name()),
                        filename: s.id(&symbol.filename()),
                    });
                    location.push(Location {
                        id,
                        line: vec![Line {
                            function_id: id,
                            line: i64::from(symbol.lineno()),
                        }],
                    });
                    functions.insert(name, id);
                    id
                }
            };
            ids.push(id);
        }
        let count = count as i64;
        sample.push(Sample {
            location_id: ids,
            value: vec![count, count.saturating_mul(1_000_000_000) / freq],
            label: vec![Label {
                key: thread,
                str: s.id(&frames.thread_name_or_id()),
            }],
        });
    }
    let samples = ValueType {
        r#type: s.id("samples"),
        unit: s.id("count"),
    };
    let cpu = ValueType {
        r#type: s.id("cpu"),
        unit: s.id("nanoseconds"),
    };
    Profile {
        sample_type: vec![samples, cpu.clone()],
        sample,
        location,
        function,
        string_table: s.table,
        time_nanos: report
            .timing
            .start_time
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64),
        duration_nanos: report.timing.duration.as_nanos() as i64,
        period_type: Some(cpu),
        period: 1_000_000_000 / freq,
    }
}

/// `report` as pprof protobuf bytes.
pub fn encode(report: &pprof::Report) -> Vec<u8> {
    profile(report).encode_to_vec()
}

/// Read a profile back (tests, and tools that check what was served).
pub fn decode(bytes: &[u8]) -> Result<Profile, prost::DecodeError> {
    Profile::decode(bytes)
}
