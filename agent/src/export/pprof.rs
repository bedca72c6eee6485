//! The pprof format (`profile.proto`, gzipped) read by `go tool pprof` and Grafana
//! Pyroscope: a Function per (name, file), a Location per (function, line).
use std::{
    collections::HashMap,
    io::Write,
    time::{Duration, SystemTime},
};

use prost::Message;

use crate::profile::{Frame, Marker, Profile, Unit};

/// What a pprof profile carries beyond the stacks.
#[derive(Debug, Clone, Copy)]
pub struct PprofMeta {
    /// Samples per second per CPU: one sample stands for 1e9 / rate_hz ns of CPU time.
    pub rate_hz: u64,
    pub start: SystemTime,
    pub duration: Duration,
}

/// Encodes the profile as a gzipped `profile.proto` message.
pub fn encode(profile: &Profile, meta: &PprofMeta) -> Vec<u8> {
    let bytes = build(profile, meta).encode_to_vec();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing to a Vec cannot fail.
    gz.write_all(&bytes).expect("gzip into memory");
    gz.finish().expect("gzip into memory")
}

/// The profile as a (not yet serialized) pprof message.
pub fn build(profile: &Profile, meta: &PprofMeta) -> proto::Profile {
    let mut b = Builder::default();
    b.string("");
    // CPU profiles: samples and the CPU time they stand for. Wall-clock and off-CPU
    // profiles (values in microseconds): thread time in nanoseconds.
    let (period, period_type, sample_type) = match profile.unit {
        Unit::Samples => {
            let cpu_ns = proto::ValueType { r#type: b.string("cpu"), unit: b.string("nanoseconds") };
            let samples = proto::ValueType { r#type: b.string("samples"), unit: b.string("count") };
            (1_000_000_000 / meta.rate_hz.max(1) as i64, cpu_ns, vec![samples, cpu_ns])
        }
        Unit::Microseconds => {
            let wall_ns = proto::ValueType { r#type: b.string("wall"), unit: b.string("nanoseconds") };
            (1_000, wall_ns, vec![wall_ns])
        }
    };
    let values = |count: i64| match profile.unit {
        Unit::Samples => vec![count, count * period],
        Unit::Microseconds => vec![count * 1_000],
    };

    let mut samples: Vec<proto::Sample> = Vec::new();
    let mut sample_index: HashMap<(Vec<u64>, Option<u32>), usize> = HashMap::new();
    for (frames, count) in &profile.stacks {
        if *count == 0 || frames.is_empty() {
            continue;
        }
        // A thread's root frame (`--threads`) becomes the sample's `thread` and `thread_id`
        // labels, as pprof tools expect, not a frame.
        let thread = frames.iter().find_map(|f| match f {
            Frame::Marker(Marker::Thread { name, tid }) => Some((name.clone(), *tid)),
            _ => None,
        });
        let ids: Vec<u64> = frames
            .iter()
            .rev()
            .filter(|f| !matches!(f, Frame::Marker(Marker::Thread { .. })))
            .map(|f| b.location(f))
            .collect();
        let count = *count as i64;
        let key = (ids, thread.as_ref().map(|(_, tid)| *tid));
        match sample_index.get(&key) {
            Some(&i) => {
                for (total, v) in samples[i].value.iter_mut().zip(values(count)) {
                    *total += v;
                }
            }
            None => {
                let label = match &thread {
                    Some((name, tid)) => vec![
                        proto::Label { key: b.string("thread"), str: b.string(name), ..Default::default() },
                        proto::Label {
                            key: b.string("thread_id"),
                            num: i64::from(*tid),
                            ..Default::default()
                        },
                    ],
                    None => vec![],
                };
                sample_index.insert(key.clone(), samples.len());
                samples.push(proto::Sample { location_id: key.0, value: values(count), label });
            }
        }
    }
    let comment = [&profile.title, &profile.subtitle]
        .into_iter()
        .filter(|s| !s.is_empty())
        .map(|s| b.string(s))
        .collect();
    let time_nanos = meta.start.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64);
    proto::Profile {
        sample_type,
        sample: samples,
        location: b.locations,
        function: b.functions,
        time_nanos,
        duration_nanos: meta.duration.as_nanos() as i64,
        period_type: Some(period_type),
        period,
        comment,
        string_table: b.strings,
        ..Default::default()
    }
}

/// Deduplicating tables: strings, functions by (name, file), locations by (function, line).
#[derive(Default)]
struct Builder {
    strings: Vec<String>,
    string_ids: HashMap<String, i64>,
    functions: Vec<proto::Function>,
    function_ids: HashMap<(i64, i64), u64>,
    locations: Vec<proto::Location>,
    location_ids: HashMap<(u64, i64), u64>,
    frame_ids: HashMap<Frame, u64>,
}

impl Builder {
    fn string(&mut self, s: &str) -> i64 {
        if let Some(&id) = self.string_ids.get(s) {
            return id;
        }
        let id = self.strings.len() as i64;
        self.strings.push(s.to_string());
        self.string_ids.insert(s.to_string(), id);
        id
    }

    /// The location id of a frame (ids start at 1).
    fn location(&mut self, frame: &Frame) -> u64 {
        if let Some(&id) = self.frame_ids.get(frame) {
            return id;
        }
        let name = self.string(&frame.symbol());
        let file = frame.file().map_or(0, |f| self.string(f));
        let function_id = *self.function_ids.entry((name, file)).or_insert_with(|| {
            let id = self.functions.len() as u64 + 1;
            self.functions.push(proto::Function {
                id,
                name,
                system_name: name,
                filename: file,
                start_line: 0,
            });
            id
        });
        let line = frame.line().map_or(0, i64::from);
        let id = *self.location_ids.entry((function_id, line)).or_insert_with(|| {
            let id = self.locations.len() as u64 + 1;
            let line = vec![proto::Line { function_id, line, column: 0 }];
            self.locations.push(proto::Location { id, mapping_id: 0, address: 0, line, is_folded: false });
            id
        });
        self.frame_ids.insert(frame.clone(), id);
        id
    }
}

/// The messages of github.com/google/pprof's `proto/profile.proto` stoker writes, with
/// that file's field numbers (mappings stay empty).
pub mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(message, repeated, tag = "3")]
        pub mapping: Vec<Mapping>,
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        #[prost(int64, tag = "7")]
        pub drop_frames: i64,
        #[prost(int64, tag = "8")]
        pub keep_frames: i64,
        #[prost(int64, tag = "9")]
        pub time_nanos: i64,
        #[prost(int64, tag = "10")]
        pub duration_nanos: i64,
        #[prost(message, optional, tag = "11")]
        pub period_type: Option<ValueType>,
        #[prost(int64, tag = "12")]
        pub period: i64,
        #[prost(int64, repeated, tag = "13")]
        pub comment: Vec<i64>,
        #[prost(int64, tag = "14")]
        pub default_sample_type: i64,
    }

    #[derive(Clone, Copy, PartialEq, prost::Message)]
    pub struct ValueType {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        /// Leaf first.
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
        #[prost(message, repeated, tag = "3")]
        pub label: Vec<Label>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Label {
        #[prost(int64, tag = "1")]
        pub key: i64,
        #[prost(int64, tag = "2")]
        pub str: i64,
        #[prost(int64, tag = "3")]
        pub num: i64,
        #[prost(int64, tag = "4")]
        pub num_unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Mapping {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub memory_start: u64,
        #[prost(uint64, tag = "3")]
        pub memory_limit: u64,
        #[prost(uint64, tag = "4")]
        pub file_offset: u64,
        #[prost(int64, tag = "5")]
        pub filename: i64,
        #[prost(int64, tag = "6")]
        pub build_id: i64,
        #[prost(bool, tag = "7")]
        pub has_functions: bool,
        #[prost(bool, tag = "8")]
        pub has_filenames: bool,
        #[prost(bool, tag = "9")]
        pub has_line_numbers: bool,
        #[prost(bool, tag = "10")]
        pub has_inline_frames: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub mapping_id: u64,
        #[prost(uint64, tag = "3")]
        pub address: u64,
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
        #[prost(bool, tag = "5")]
        pub is_folded: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Line {
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
        #[prost(int64, tag = "2")]
        pub line: i64,
        #[prost(int64, tag = "3")]
        pub column: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Function {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "2")]
        pub name: i64,
        #[prost(int64, tag = "3")]
        pub system_name: i64,
        #[prost(int64, tag = "4")]
        pub filename: i64,
        #[prost(int64, tag = "5")]
        pub start_line: i64,
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn py(function: &str, file: &str, line: u32) -> Frame {
        Frame::Python { function: function.into(), file: file.into(), line }
    }

    fn native(function: &str) -> Frame {
        Frame::Native { function: function.into() }
    }

    fn meta() -> PprofMeta {
        PprofMeta {
            rate_hz: 100,
            start: SystemTime::UNIX_EPOCH + Duration::from_secs(5),
            duration: Duration::from_secs(3),
        }
    }

    #[test]
    fn deduplicates_functions_locations_and_strings() {
        let profile = Profile {
            stacks: vec![
                (vec![native("main"), py("f", "a.py", 1), native("hot_a")], 3),
                (vec![native("main"), py("f", "a.py", 2), native("hot_a")], 2),
                (vec![native("main"), py("f", "a.py", 1), native("hot_a")], 4),
                (vec![native("main")], 0),
            ],
            ..Default::default()
        };
        let p = build(&profile, &meta());
        let s = |i: i64| p.string_table[i as usize].as_str();
        assert_eq!(p.string_table[0], "");
        let mut sorted = p.string_table.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), p.string_table.len(), "duplicate strings: {:?}", p.string_table);

        // main, f (a.py), hot_a: one Function each; f has two Locations (lines 1 and 2).
        let names: Vec<_> = p.function.iter().map(|f| s(f.name)).collect();
        assert_eq!(names, ["hot_a", "f", "main"]);
        let f = &p.function[1];
        assert_eq!((s(f.filename), s(f.system_name)), ("a.py", "f"));
        assert_eq!(s(p.function[0].filename), "");
        assert_eq!(p.location.len(), 4);
        let lines: Vec<_> = p.location.iter().map(|l| (l.line[0].function_id, l.line[0].line)).collect();
        assert_eq!(lines, [(1, 0), (2, 1), (3, 0), (2, 2)]);

        // Identical stacks merged, leaf first, values = count and count x 10 ms.
        assert_eq!(p.sample.len(), 2);
        assert_eq!(p.sample[0].location_id, [1, 2, 3]);
        assert_eq!(p.sample[0].value, [7, 70_000_000]);
        assert_eq!(p.sample[1].location_id, [1, 4, 3]);
        assert_eq!(p.sample[1].value, [2, 20_000_000]);

        let types: Vec<_> = p.sample_type.iter().map(|t| (s(t.r#type), s(t.unit))).collect();
        assert_eq!(types, [("samples", "count"), ("cpu", "nanoseconds")]);
        let period_type = p.period_type.unwrap();
        assert_eq!((s(period_type.r#type), s(period_type.unit)), ("cpu", "nanoseconds"));
        assert_eq!(p.period, 10_000_000);
        assert_eq!(p.time_nanos, 5_000_000_000);
        assert_eq!(p.duration_nanos, 3_000_000_000);
    }

    #[test]
    fn threads_become_labels_not_frames() {
        let thread = |name: &str, tid| Frame::Marker(Marker::Thread { name: name.into(), tid });
        let profile = Profile {
            stacks: vec![
                (vec![thread("worker-1", 11), native("main"), native("hot")], 3),
                (vec![thread("worker-2", 12), native("main"), native("hot")], 2),
                (vec![thread("worker-1", 11), native("main"), native("hot")], 1),
            ],
            ..Default::default()
        };
        let p = build(&profile, &meta());
        let s = |i: i64| p.string_table[i as usize].as_str();
        let names: Vec<_> = p.function.iter().map(|f| s(f.name)).collect();
        assert_eq!(names, ["hot", "main"], "no thread frames");
        let labelled: Vec<_> = p
            .sample
            .iter()
            .map(|x| {
                let (name, tid) = (&x.label[0], &x.label[1]);
                ((s(name.key), s(name.str)), (s(tid.key), tid.num), x.value[0])
            })
            .collect();
        assert_eq!(
            labelled,
            [(("thread", "worker-1"), ("thread_id", 11), 4), (("thread", "worker-2"), ("thread_id", 12), 2)]
        );
    }

    #[test]
    fn encodes_gzipped_protobuf_that_decodes_back() {
        let profile = Profile {
            title: "stoker: test".into(),
            stacks: vec![(vec![native("main"), native("hot_b")], 5)],
            ..Default::default()
        };
        let bytes = encode(&profile, &meta());
        assert_eq!(&bytes[..2], [0x1f, 0x8b], "gzip magic");
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..]).read_to_end(&mut raw).unwrap();
        let decoded = proto::Profile::decode(&raw[..]).unwrap();
        assert_eq!(decoded, build(&profile, &meta()));
        assert_eq!(decoded.string_table[decoded.comment[0] as usize], "stoker: test");
    }
}
