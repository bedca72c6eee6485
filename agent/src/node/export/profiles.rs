//! OTLP profiles (v1development, proto 1.10): each interval's profile of every process as
//! one ExportProfilesServiceRequest, a ResourceProfiles per process over one dictionary.
use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

use opentelemetry_proto::tonic::{
    collector::profiles::v1development::ExportProfilesServiceRequest,
    common::v1::{AnyValue, any_value},
    profiles::v1development::{
        Function, KeyValueAndUnit, Line, Link, Location, Mapping, Profile, ProfilesDictionary,
        ResourceProfiles, Sample, ScopeProfiles, Stack, ValueType,
    },
    resource::v1::Resource,
};

use crate::node::{
    encode::{kv, nanos, stoker_scope},
    state::Snapshot,
};
use crate::profile::{self, Frame, FrameKind};

/// The request for this interval's profiles (`rate_hz` gives the period); None when no
/// process was sampled.
pub fn request(
    profiles: &HashMap<u32, profile::Profile>,
    snapshot: &Snapshot,
    rate_hz: u64,
    interval: Duration,
) -> Option<ExportProfilesServiceRequest> {
    let mut d = Dictionary::new();
    let end = snapshot.time.unwrap_or_else(SystemTime::now);
    let start = nanos(Some(end.checked_sub(interval).unwrap_or(end)));
    // As the OpenTelemetry eBPF profiler: a sample counts one tick of the CPU clock.
    let sample_type = ValueType { type_strindex: d.string("samples"), unit_strindex: d.string("count") };
    let period_type = ValueType { type_strindex: d.string("cpu"), unit_strindex: d.string("nanoseconds") };
    let mut pids: Vec<&u32> = profiles.keys().collect();
    pids.sort();
    let resource_profiles: Vec<ResourceProfiles> = pids
        .into_iter()
        .filter_map(|pid| {
            let process = snapshot.processes.get(pid)?;
            let mut samples: Vec<Sample> = Vec::new();
            let mut by_stack: HashMap<i32, usize> = HashMap::new();
            for (frames, count) in &profiles[pid].stacks {
                if *count == 0 || frames.is_empty() {
                    continue;
                }
                let stack = d.stack(frames);
                match by_stack.get(&stack) {
                    Some(&i) => samples[i].values[0] += *count as i64,
                    None => {
                        by_stack.insert(stack, samples.len());
                        samples.push(Sample {
                            stack_index: stack,
                            values: vec![*count as i64],
                            ..Default::default()
                        });
                    }
                }
            }
            if samples.is_empty() {
                return None;
            }
            let profile = Profile {
                sample_type: Some(sample_type),
                samples,
                time_unix_nano: start,
                duration_nano: interval.as_nanos() as u64,
                period_type: Some(period_type),
                period: 1_000_000_000 / rate_hz.max(1) as i64,
                ..Default::default()
            };
            Some(ResourceProfiles {
                resource: Some(Resource {
                    attributes: process.resource.iter().map(|(k, v)| kv(k, v)).collect(),
                    ..Default::default()
                }),
                scope_profiles: vec![ScopeProfiles {
                    scope: Some(stoker_scope()),
                    profiles: vec![profile],
                    ..Default::default()
                }],
                ..Default::default()
            })
        })
        .collect();
    (!resource_profiles.is_empty())
        .then_some(ExportProfilesServiceRequest { resource_profiles, dictionary: Some(d.tables) })
}

/// The request's shared tables, each starting with its zero entry as the format requires.
struct Dictionary {
    tables: ProfilesDictionary,
    strings: HashMap<String, i32>,
    functions: HashMap<(i32, i32), i32>,
    locations: HashMap<(i32, i64, i32), i32>,
    stacks: HashMap<Vec<i32>, i32>,
    frames: HashMap<Frame, i32>,
    frame_types: HashMap<&'static str, i32>,
}

impl Dictionary {
    fn new() -> Self {
        let mut d = Self {
            tables: ProfilesDictionary {
                mapping_table: vec![Mapping::default()],
                location_table: vec![Location::default()],
                function_table: vec![Function::default()],
                link_table: vec![Link::default()],
                string_table: vec![],
                attribute_table: vec![KeyValueAndUnit::default()],
                stack_table: vec![Stack::default()],
            },
            strings: HashMap::new(),
            functions: HashMap::new(),
            locations: HashMap::new(),
            stacks: HashMap::new(),
            frames: HashMap::new(),
            frame_types: HashMap::new(),
        };
        d.string("");
        d
    }

    fn string(&mut self, s: &str) -> i32 {
        if let Some(&i) = self.strings.get(s) {
            return i;
        }
        let i = self.tables.string_table.len() as i32;
        self.tables.string_table.push(s.to_string());
        self.strings.insert(s.to_string(), i);
        i
    }

    /// A stack of frames root to leaf, stored leaf first as the format wants.
    fn stack(&mut self, frames: &[Frame]) -> i32 {
        let locations: Vec<i32> = frames.iter().rev().map(|f| self.frame(f)).collect();
        if let Some(&i) = self.stacks.get(&locations) {
            return i;
        }
        let i = self.tables.stack_table.len() as i32;
        self.tables.stack_table.push(Stack { location_indices: locations.clone() });
        self.stacks.insert(locations, i);
        i
    }

    /// The location of a frame: a function (name, file) at a line, typed by the
    /// `profile.frame.type` attribute (`cpython`, `kernel`, `native`, or `abort-marker`
    /// for the marks of a cut or lost stack, as the OpenTelemetry eBPF profiler names them).
    fn frame(&mut self, frame: &Frame) -> i32 {
        if let Some(&i) = self.frames.get(frame) {
            return i;
        }
        let kind = match frame.kind() {
            FrameKind::Python => "cpython",
            FrameKind::Kernel => "kernel",
            FrameKind::Native => "native",
            FrameKind::Synthetic => "abort-marker",
        };
        let name = self.string(&frame.name());
        let file = frame.file().map_or(0, |f| self.string(f));
        let function = match self.functions.get(&(name, file)) {
            Some(&i) => i,
            None => {
                let i = self.tables.function_table.len() as i32;
                let f = Function {
                    name_strindex: name,
                    system_name_strindex: name,
                    filename_strindex: file,
                    start_line: 0,
                };
                self.tables.function_table.push(f);
                self.functions.insert((name, file), i);
                i
            }
        };
        let line = frame.line().map_or(0, i64::from);
        let kind = self.frame_type(kind);
        let location = match self.locations.get(&(function, line, kind)) {
            Some(&i) => i,
            None => {
                let i = self.tables.location_table.len() as i32;
                self.tables.location_table.push(Location {
                    lines: vec![Line { function_index: function, line, column: 0 }],
                    attribute_indices: vec![kind],
                    ..Default::default()
                });
                self.locations.insert((function, line, kind), i);
                i
            }
        };
        self.frames.insert(frame.clone(), location);
        location
    }

    fn frame_type(&mut self, kind: &'static str) -> i32 {
        if let Some(&i) = self.frame_types.get(kind) {
            return i;
        }
        let key = self.string("profile.frame.type");
        let i = self.tables.attribute_table.len() as i32;
        self.tables.attribute_table.push(KeyValueAndUnit {
            key_strindex: key,
            value: Some(AnyValue { value: Some(any_value::Value::StringValue(kind.into())) }),
            unit_strindex: 0,
        });
        self.frame_types.insert(kind, i);
        i
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stacks_resolve_through_the_dictionary() {
        let py =
            |function: &str, line| Frame::Python { function: function.into(), file: "app.py".into(), line };
        let kernel = Frame::Kernel { function: "do_syscall_64".into() };
        let profile = profile::Profile {
            stacks: vec![
                (vec![py("<module>", 3), py("burn", 10)], 5),
                (vec![py("<module>", 3), py("burn", 10), kernel], 2),
            ],
            ..Default::default()
        };
        let mut snapshot = Snapshot { time: Some(SystemTime::now()), ..Default::default() };
        let mut process = crate::node::state::ProcessMetrics::default();
        process.resource.insert("service.name".into(), "app".into());
        snapshot.processes.insert(7, process);
        let r = request(&HashMap::from([(7, profile)]), &snapshot, 100, Duration::from_secs(1)).unwrap();
        let d = r.dictionary.unwrap();
        let p = &r.resource_profiles[0].scope_profiles[0].profiles[0];
        assert_eq!(p.period, 10_000_000);
        assert_eq!(d.string_table[0], "");
        let leaf_of = |s: &Sample| {
            let location =
                &d.location_table[d.stack_table[s.stack_index as usize].location_indices[0] as usize];
            let function = &d.function_table[location.lines[0].function_index as usize];
            let kind = &d.attribute_table[location.attribute_indices[0] as usize];
            let kind = match kind.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.as_str(),
                _ => "",
            };
            (
                d.string_table[function.name_strindex as usize].as_str(),
                location.lines[0].line,
                kind,
                s.values[0],
            )
        };
        let mut leaves: Vec<_> = p.samples.iter().map(leaf_of).collect();
        leaves.sort();
        assert_eq!(leaves, vec![("burn", 10, "cpython", 5), ("do_syscall_64", 0, "kernel", 2)]);
        assert_eq!(r.resource_profiles[0].resource.as_ref().unwrap().attributes[0].key, "service.name");
    }
}
