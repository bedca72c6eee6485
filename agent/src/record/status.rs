//! The live status line of a recording session, drawn on stderr only when it is a terminal.
use std::{
    io::{IsTerminal, Write},
    time::Duration,
};

use crate::programs::Stats;

pub struct StatusLine {
    enabled: bool,
}

impl StatusLine {
    pub fn new() -> Self {
        Self { enabled: std::io::stderr().is_terminal() }
    }

    /// Says once that sampling runs, when no live line will (stderr is not a terminal).
    pub fn started(&self, rate_hz: u64, net: bool) {
        if !self.enabled {
            let net = if net { " and timing network requests" } else { "" };
            eprintln!("stoker: sampling at {rate_hz} Hz{net}; Ctrl-C or SIGTERM ends the session");
        }
    }

    pub fn show(&mut self, elapsed: Duration, samples: u64, stats: Stats) {
        if self.enabled {
            let mut err = std::io::stderr().lock();
            let _ = write!(
                err,
                "\r\x1b[2Kstoker: {:6.1} s  {samples} samples  {} lost  (Ctrl-C to stop)",
                elapsed.as_secs_f64(),
                stats.lost + stats.stacks_dropped
            );
            let _ = err.flush();
        }
    }

    pub fn clear(&mut self) {
        if self.enabled {
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
        }
    }
}
