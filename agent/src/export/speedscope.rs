//! speedscope's JSON file format (https://www.speedscope.app/file-format-schema.json):
//! one "sampled" profile, frames shared by index, weights in samples.
use std::collections::HashMap;

use serde::Serialize;

use crate::profile::{self, Profile, Unit};

pub const SCHEMA: &str = "https://www.speedscope.app/file-format-schema.json";

#[derive(Debug, Serialize)]
pub struct File {
    #[serde(rename = "$schema")]
    pub schema: &'static str,
    pub shared: Shared,
    pub profiles: Vec<SampledProfile>,
    pub name: String,
    #[serde(rename = "activeProfileIndex")]
    pub active_profile_index: u32,
    pub exporter: String,
}

#[derive(Debug, Serialize)]
pub struct Shared {
    pub frames: Vec<Frame>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Frame {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct SampledProfile {
    /// Always "sampled".
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub name: String,
    /// "none": weights are sample counts.
    pub unit: &'static str,
    #[serde(rename = "startValue")]
    pub start_value: u64,
    #[serde(rename = "endValue")]
    pub end_value: u64,
    /// Indices into `shared.frames`, root to leaf.
    pub samples: Vec<Vec<usize>>,
    pub weights: Vec<u64>,
}

/// The profile as a speedscope file; identical frames share one entry.
pub fn build(profile: &Profile) -> File {
    let mut frames: Vec<Frame> = Vec::new();
    let mut frame_index: HashMap<&profile::Frame, usize> = HashMap::new();
    let mut by_parts: HashMap<Frame, usize> = HashMap::new();
    let mut samples: Vec<Vec<usize>> = Vec::new();
    let mut weights: Vec<u64> = Vec::new();
    let mut sample_index: HashMap<Vec<usize>, usize> = HashMap::new();
    for (stack, count) in &profile.stacks {
        if *count == 0 || stack.is_empty() {
            continue;
        }
        let indices: Vec<usize> = stack
            .iter()
            .map(|f| {
                *frame_index.entry(f).or_insert_with(|| {
                    let frame = Frame {
                        name: f.symbol().into_owned(),
                        file: f.file().map(str::to_string),
                        line: f.line(),
                    };
                    *by_parts.entry(frame.clone()).or_insert_with(|| {
                        frames.push(frame);
                        frames.len() - 1
                    })
                })
            })
            .collect();
        // Stacks that differ only below the names (addresses, threads merged) merge here.
        match sample_index.get(&indices) {
            Some(&i) => weights[i] += count,
            None => {
                sample_index.insert(indices.clone(), samples.len());
                samples.push(indices);
                weights.push(*count);
            }
        }
    }
    let name = if profile.title.is_empty() { "stoker".to_string() } else { profile.title.clone() };
    File {
        schema: SCHEMA,
        shared: Shared { frames },
        profiles: vec![SampledProfile {
            kind: "sampled",
            name: name.clone(),
            unit: match profile.unit {
                Unit::Samples => "none",
                Unit::Microseconds => "microseconds",
            },
            start_value: 0,
            end_value: weights.iter().sum(),
            samples,
            weights,
        }],
        name,
        active_profile_index: 0,
        exporter: format!("stoker {}", env!("CARGO_PKG_VERSION")),
    }
}

/// Writes the profile as speedscope JSON.
pub fn write(profile: &Profile, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    serde_json::to_writer(out, &build(profile)).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::Frame as F;

    #[test]
    fn shares_frames_and_keeps_weights() {
        let native = |f: &str| F::Native { function: f.into() };
        let work = F::Python { function: "work".into(), file: "app.py".into(), line: 3 };
        let profile = Profile {
            title: "stoker: app (pid 1)".into(),
            stacks: vec![
                (vec![native("main"), work.clone(), native("hot_a")], 3),
                (vec![native("main"), native("hot_a")], 2),
                (vec![native("main"), work, native("hot_a")], 1),
                (vec![native("main")], 0),
            ],
            ..Default::default()
        };
        let mut out = Vec::new();
        write(&profile, &mut out).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(json["$schema"], SCHEMA);
        assert_eq!(json["name"], "stoker: app (pid 1)");
        assert!(json["exporter"].as_str().unwrap().starts_with("stoker "));
        let frames = json["shared"]["frames"].as_array().unwrap();
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[1], serde_json::json!({"name": "work", "file": "app.py", "line": 3}));
        assert_eq!(frames[2], serde_json::json!({"name": "hot_a"}));
        let p = &json["profiles"][0];
        assert_eq!(p["type"], "sampled");
        assert_eq!(p["samples"], serde_json::json!([[0, 1, 2], [0, 2]]));
        assert_eq!(p["weights"], serde_json::json!([4, 2]));
        assert_eq!(p["endValue"], 6);
    }
}
