//! Flamegraph SVGs, drawn by inferno from the folded lines.
use std::io::Write;

use super::folded;
use crate::profile::{Profile, Unit};

/// Writes the profile as an interactive SVG flamegraph.
pub fn write(profile: &Profile, out: &mut dyn Write) -> std::io::Result<()> {
    let lines = folded::lines(profile);
    let mut options = inferno::flamegraph::Options::default();
    options.title = profile.title.clone();
    options.subtitle = Some(profile.subtitle.clone());
    options.count_name = match profile.unit {
        Unit::Samples => "samples",
        Unit::Microseconds => "µs",
    }
    .into();
    if lines.is_empty() {
        // inferno refuses empty input; an empty profile is still a valid SVG.
        return write!(
            out,
            "<?xml version=\"1.0\" standalone=\"no\"?><svg xmlns=\"http://www.w3.org/2000/svg\" width=\"600\" height=\"60\"><text x=\"10\" y=\"30\">{}: no samples</text></svg>",
            xml_escape(&profile.title)
        );
    }
    inferno::flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), out)
        .map_err(std::io::Error::other)
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
