//! Latency samples and their percentiles (exact: every sample is kept, sorted once).

use std::time::Duration;

/// Latencies of one run, in microseconds.
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    micros: Vec<u64>,
    sorted: bool,
}

impl Histogram {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn record(&mut self, d: Duration) {
        self.micros
            .push(d.as_micros().min(u128::from(u64::MAX)) as u64);
        self.sorted = false;
    }

    pub fn record_micros(&mut self, us: u64) {
        self.micros.push(us);
        self.sorted = false;
    }

    pub fn merge(&mut self, other: &Histogram) {
        self.micros.extend_from_slice(&other.micros);
        self.sorted = false;
    }

    pub fn len(&self) -> usize {
        self.micros.len()
    }

    pub fn is_empty(&self) -> bool {
        self.micros.is_empty()
    }

    fn sort(&mut self) {
        if !self.sorted {
            self.micros.sort_unstable();
            self.sorted = true;
        }
    }

    /// The nearest-rank percentile `p` (0..=100) in milliseconds: the smallest sample with at
    /// least `p`% of the samples at or below it (`None` when empty).
    pub fn percentile_ms(&mut self, p: f64) -> Option<f64> {
        if self.micros.is_empty() {
            return None;
        }
        self.sort();
        let n = self.micros.len();
        // The epsilon keeps 99.9 % of 1,000 at rank 999 (0.999 * 1000 is 999.0000000000001).
        let rank = ((p / 100.0) * n as f64 - 1e-9).ceil() as usize;
        let idx = rank.clamp(1, n) - 1;
        Some(self.micros[idx] as f64 / 1000.0)
    }

    pub fn max_ms(&mut self) -> Option<f64> {
        self.percentile_ms(100.0)
    }

    pub fn mean_ms(&self) -> Option<f64> {
        if self.micros.is_empty() {
            return None;
        }
        Some(self.micros.iter().sum::<u64>() as f64 / self.micros.len() as f64 / 1000.0)
    }

    /// The sorted samples in milliseconds (for plots).
    pub fn sorted_ms(&mut self) -> Vec<f64> {
        self.sort();
        self.micros.iter().map(|&u| u as f64 / 1000.0).collect()
    }

    /// p50, p90, p99, p99.9 and max in milliseconds (zeros when empty).
    pub fn summary(&mut self) -> Summary {
        let mut p = |q| self.percentile_ms(q).unwrap_or(0.0);
        Summary {
            n: 0,
            p50: p(50.0),
            p90: p(90.0),
            p99: p(99.0),
            p999: p(99.9),
            max: p(100.0),
        }
        .with_n(self.micros.len())
    }
}

/// The percentiles a report prints.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Summary {
    fn with_n(mut self, n: usize) -> Self {
        self.n = n;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles_of_one_to_a_thousand() {
        let mut h = Histogram::new();
        for ms in (1..=1000).rev() {
            h.record(Duration::from_millis(ms));
        }
        let s = h.summary();
        assert_eq!(s.n, 1000);
        assert_eq!(s.p50, 500.0);
        assert_eq!(s.p90, 900.0);
        assert_eq!(s.p99, 990.0);
        assert_eq!(s.p999, 999.0);
        assert_eq!(s.max, 1000.0);
        assert_eq!(h.percentile_ms(0.0), Some(1.0));
        assert_eq!(h.mean_ms(), Some(500.5));
    }

    #[test]
    fn one_sample_is_every_percentile_and_empty_is_none() {
        let mut h = Histogram::new();
        assert_eq!(h.percentile_ms(50.0), None);
        assert_eq!(h.summary(), Summary::default());
        h.record_micros(1500);
        assert_eq!(h.percentile_ms(1.0), Some(1.5));
        assert_eq!(h.percentile_ms(99.9), Some(1.5));
    }

    #[test]
    fn merged_histograms_keep_every_sample() {
        let mut a = Histogram::new();
        let mut b = Histogram::new();
        for i in 0..10 {
            a.record_micros(i * 1000);
            b.record_micros(100_000 + i);
        }
        a.merge(&b);
        assert_eq!(a.len(), 20);
        assert_eq!(a.percentile_ms(50.0), Some(9.0));
        assert_eq!(a.max_ms(), Some(100.009));
    }
}
