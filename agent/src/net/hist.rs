//! Latency histograms: the OpenTelemetry advised buckets for export, plus log buckets 2%
//! wide whose geometric middle is within 1% of any value in them, for quantiles.
use std::collections::BTreeMap;

use serde::Serialize;

/// Upper bounds (seconds) of the buckets OpenTelemetry's semantic conventions advise for
/// `http.server.request.duration` and `http.client.request.duration`.
pub const OTEL_BOUNDS_S: [f64; 14] =
    [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0];

/// Growth factor of the quantile buckets.
const RATIO: f64 = 1.02;
/// Values below this (ns) share the first quantile bucket.
const FLOOR_NS: f64 = 1000.0;

/// Durations in nanoseconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    pub count: u64,
    pub sum_ns: u64,
    pub min_ns: u64,
    pub max_ns: u64,
    /// Counts per `OTEL_BOUNDS_S` bucket, the last one above 10 s.
    pub otel: [u64; OTEL_BOUNDS_S.len() + 1],
    log: BTreeMap<u32, u64>,
}

/// A histogram's summary for reports, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Quantiles {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Histogram {
    pub fn record(&mut self, ns: u64) {
        if self.count == 0 || ns < self.min_ns {
            self.min_ns = ns;
        }
        self.max_ns = self.max_ns.max(ns);
        self.count += 1;
        // Only a corrupt event lasts centuries; its sum pins at the top rather than wrapping.
        self.sum_ns = self.sum_ns.saturating_add(ns);
        let s = ns as f64 / 1e9;
        let i = OTEL_BOUNDS_S.iter().position(|&b| s <= b).unwrap_or(OTEL_BOUNDS_S.len());
        self.otel[i] += 1;
        *self.log.entry(log_index(ns)).or_default() += 1;
    }

    pub fn merge(&mut self, other: &Histogram) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 || other.min_ns < self.min_ns {
            self.min_ns = other.min_ns;
        }
        self.max_ns = self.max_ns.max(other.max_ns);
        self.count += other.count;
        self.sum_ns = self.sum_ns.saturating_add(other.sum_ns);
        for (a, b) in self.otel.iter_mut().zip(other.otel) {
            *a += b;
        }
        for (&i, &n) in &other.log {
            *self.log.entry(i).or_default() += n;
        }
    }

    /// The nearest-rank `q` quantile (0 < q <= 1), within 1% of the exact value.
    pub fn quantile_ns(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (&i, &n) in &self.log {
            seen += n;
            if seen >= rank {
                return (bucket_middle(i) as u64).clamp(self.min_ns, self.max_ns);
            }
        }
        self.max_ns
    }

    /// Counts per bucket of upper `bounds` (seconds, ascending; one more bucket above the
    /// last): exact for `OTEL_BOUNDS_S`, otherwise from the 2 % quantile buckets.
    pub fn bucket_counts(&self, bounds: &[f64]) -> Vec<u64> {
        if bounds == OTEL_BOUNDS_S {
            return self.otel.to_vec();
        }
        let mut counts = vec![0; bounds.len() + 1];
        for (&i, &n) in &self.log {
            let s = bucket_middle(i).clamp(self.min_ns as f64, self.max_ns as f64) / 1e9;
            counts[bounds.iter().position(|&b| s <= b).unwrap_or(bounds.len())] += n;
        }
        counts
    }

    pub fn quantiles(&self) -> Quantiles {
        let ms = |ns: u64| ns as f64 / 1e6;
        Quantiles {
            p50_ms: ms(self.quantile_ns(0.5)),
            p90_ms: ms(self.quantile_ns(0.9)),
            p99_ms: ms(self.quantile_ns(0.99)),
            max_ms: ms(self.max_ns),
            mean_ms: if self.count == 0 { 0.0 } else { ms(self.sum_ns) / self.count as f64 },
        }
    }
}

fn log_index(ns: u64) -> u32 {
    if (ns as f64) < FLOOR_NS { 0 } else { 1 + ((ns as f64 / FLOOR_NS).ln() / RATIO.ln()) as u32 }
}

/// Geometric middle of a quantile bucket.
fn bucket_middle(i: u32) -> f64 {
    if i == 0 { FLOOR_NS / 2.0 } else { FLOOR_NS * RATIO.powf(i as f64 - 1.0 + 0.5) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_saturate_instead_of_overflowing() {
        let mut h = Histogram::default();
        h.record(u64::MAX - 1);
        h.record(5);
        let mut merged = h.clone();
        merged.merge(&h);
        assert_eq!((h.count, h.sum_ns, h.max_ns), (2, u64::MAX, u64::MAX - 1));
        assert_eq!((merged.count, merged.sum_ns), (4, u64::MAX));
        assert_eq!(h.quantile_ns(1.0), u64::MAX - 1);
    }

    #[test]
    fn quantiles_are_within_one_percent() {
        let mut h = Histogram::default();
        let values: Vec<u64> = (1..=1000).map(|i| 1_000_000 + i * 37_123).collect();
        for &v in values.iter().rev() {
            h.record(v);
        }
        for q in [0.5, 0.9, 0.99] {
            let exact = values[(q * 1000.0_f64).ceil() as usize - 1] as f64;
            let got = h.quantile_ns(q) as f64;
            assert!((got - exact).abs() / exact < 0.01, "q{q}: {got} vs {exact}");
        }
        assert_eq!(h.max_ns, *values.last().unwrap());
        assert_eq!(h.otel.iter().sum::<u64>(), 1000);
    }

    #[test]
    fn buckets_of_other_bounds() {
        let mut h = Histogram::default();
        for us in [50, 80, 120, 900, 3000] {
            h.record(us * 1000);
        }
        assert_eq!(h.bucket_counts(&[0.0001, 0.001]), vec![2, 2, 1]);
        assert_eq!(h.bucket_counts(&OTEL_BOUNDS_S)[0], 5);
    }

    #[test]
    fn otel_buckets_take_upper_bounds_inclusively() {
        let mut h = Histogram::default();
        h.record(5_000_000);
        h.record(5_000_001);
        h.record(11_000_000_000);
        assert_eq!(h.otel[0], 1);
        assert_eq!(h.otel[1], 1);
        assert_eq!(h.otel[OTEL_BOUNDS_S.len()], 1);
        let mut m = Histogram::default();
        m.merge(&h);
        assert_eq!(m, h);
    }
}
