//! The collapsed-stack format read by inferno and flamegraph.pl: one line per unique
//! stack, frames root to leaf joined by `;`, a space, the sample count.
use std::collections::BTreeMap;

use crate::profile::Profile;

/// The profile's folded lines, identical stacks merged, sorted for stable output.
pub fn lines(profile: &Profile) -> Vec<String> {
    let mut merged: BTreeMap<String, u64> = BTreeMap::new();
    for (frames, count) in &profile.stacks {
        if *count == 0 || frames.is_empty() {
            continue;
        }
        let stack =
            frames.iter().map(|f| sanitize(&f.to_string()).into_owned()).collect::<Vec<_>>().join(";");
        *merged.entry(stack).or_default() += count;
    }
    merged.into_iter().map(|(stack, count)| format!("{stack} {count}")).collect()
}

/// Frame names must not contain the separator or line breaks.
fn sanitize(frame: &str) -> std::borrow::Cow<'_, str> {
    if frame.contains([';', '\n', '\r']) {
        frame.replace(';', ":").replace(['\n', '\r'], " ").into()
    } else {
        frame.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::Frame;

    #[test]
    fn merges_identical_stacks_and_escapes_separators() {
        let f = |names: &[&str]| {
            names.iter().map(|n| Frame::Native { function: (*n).into() }).collect::<Vec<Frame>>()
        };
        let profile = Profile {
            stacks: vec![
                (f(&["main", "work"]), 3),
                (f(&["main", "work"]), 2),
                (f(&["main", "a;b"]), 1),
                (f(&["main"]), 0),
            ],
            ..Default::default()
        };
        assert_eq!(lines(&profile), vec!["main;a:b 1".to_string(), "main;work 5".to_string()]);
    }
}
