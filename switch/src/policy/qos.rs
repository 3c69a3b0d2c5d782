//! Rate limiting: vSphere-style average / peak / burst policers.
//!
//! A [`Policer`] holds two token buckets: the average bucket fills at the
//! average rate up to the burst bonus; the peak bucket fills at the peak
//! rate up to one large frame, so a burst leaves no faster than the peak. A
//! frame passes when both buckets are not in debt, and is then charged to
//! both — a bucket may go into debt by one frame, so that a 64 KB GSO frame
//! passes a small bucket and the long-run rate still holds. Sans-IO: time
//! comes in as `now`.

pub use dvs_proto::stats::PolicerCounters;
use std::time::Duration;

use dvs_proto::RateLimit;

/// One token bucket, counted in bytes (may go into debt by one frame).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    /// Bytes per second.
    rate: f64,
    /// The most bytes it holds.
    size: f64,
    tokens: f64,
    last: Duration,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate_bytes_per_s: f64, size: f64, now: Duration) -> Self {
        TokenBucket {
            rate: rate_bytes_per_s,
            size,
            tokens: size,
            last: now,
        }
    }

    fn refill(&mut self, now: Duration) {
        let dt = now.saturating_sub(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.size);
        self.last = self.last.max(now);
    }

    /// Bytes available now (negative: in debt).
    pub fn tokens(&mut self, now: Duration) -> f64 {
        self.refill(now);
        self.tokens
    }

    fn charge(&mut self, len: usize) {
        self.tokens -= len as f64;
    }
}

/// An average / peak / burst policer.
#[derive(Debug, Clone)]
pub struct Policer {
    limit: RateLimit,
    avg: TokenBucket,
    peak: Option<TokenBucket>,
    counters: PolicerCounters,
}

/// A policer's saved runtime state.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PolicerState {
    /// Bytes in the average bucket (negative: debt).
    pub avg_tokens: f64,
    pub peak_tokens: Option<f64>,
    pub counters: PolicerCounters,
}

/// The peak bucket holds one GSO frame.
const PEAK_BUCKET: f64 = 65_536.0;

impl Policer {
    pub fn new(limit: RateLimit, now: Duration) -> Self {
        Policer {
            avg: TokenBucket::new(limit.avg_bps as f64 / 8.0, limit.burst_bytes as f64, now),
            peak: limit
                .peak_bps
                .map(|p| TokenBucket::new(p as f64 / 8.0, PEAK_BUCKET, now)),
            limit,
            counters: PolicerCounters::default(),
        }
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    pub fn counters(&self) -> &PolicerCounters {
        &self.counters
    }

    /// The policer's runtime state, to carry it elsewhere (another host's
    /// clock: token levels are saved as of `now`).
    pub fn save(&mut self, now: Duration) -> PolicerState {
        PolicerState {
            avg_tokens: self.avg.tokens(now),
            peak_tokens: self.peak.as_mut().map(|p| p.tokens(now)),
            counters: self.counters,
        }
    }

    /// Continue from `state` at `now` (on this host's clock).
    pub fn restore(&mut self, state: &PolicerState, now: Duration) {
        self.avg.tokens = state.avg_tokens.min(self.avg.size);
        self.avg.last = now;
        if let (Some(p), Some(t)) = (self.peak.as_mut(), state.peak_tokens) {
            p.tokens = t.min(p.size);
            p.last = now;
        }
        self.counters = state.counters;
    }

    /// As a shaper: how long until a frame may be taken at `now` (`None`:
    /// now). The buckets are out of debt by then.
    pub fn wait(&mut self, now: Duration) -> Option<Duration> {
        let need = |b: &mut TokenBucket| {
            let t = b.tokens(now);
            (t <= 0.0).then(|| Duration::from_secs_f64((1.0 - t) / b.rate))
        };
        let a = need(&mut self.avg);
        let p = self.peak.as_mut().and_then(need);
        a.max(p)
    }

    /// As a shaper: charge a frame that was taken (it may put the buckets
    /// into debt by one frame).
    pub fn charge(&mut self, now: Duration, len: usize) {
        self.avg.refill(now);
        self.avg.charge(len);
        if let Some(p) = self.peak.as_mut() {
            p.refill(now);
            p.charge(len);
        }
        self.counters.passed_frames += 1;
        self.counters.passed_bytes += len as u64;
    }

    /// Does a frame of `len` bytes pass at `now`? Charges it when it does.
    pub fn admit(&mut self, now: Duration, len: usize) -> bool {
        let ok =
            self.avg.tokens(now) > 0.0 && self.peak.as_mut().is_none_or(|p| p.tokens(now) > 0.0);
        if ok {
            self.avg.charge(len);
            if let Some(p) = self.peak.as_mut() {
                p.charge(len);
            }
            self.counters.passed_frames += 1;
            self.counters.passed_bytes += len as u64;
        } else {
            self.counters.dropped_frames += 1;
            self.counters.dropped_bytes += len as u64;
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limit(avg_mbps: u64, peak_mbps: Option<u64>, burst: u64) -> RateLimit {
        RateLimit {
            avg_bps: avg_mbps * 1_000_000,
            peak_bps: peak_mbps.map(|p| p * 1_000_000),
            burst_bytes: burst,
            shape: false,
            queue_bytes: 0,
        }
    }

    /// Offer 1500-byte frames every `gap` for `total`; bytes passed.
    fn offer(p: &mut Policer, gap: Duration, total: Duration) -> u64 {
        let mut t = Duration::ZERO;
        let mut passed = 0;
        while t < total {
            if p.admit(t, 1500) {
                passed += 1500;
            }
            t += gap;
        }
        passed
    }

    #[test]
    fn a_flood_is_cut_to_the_average_rate() {
        // 10 Mbit/s limit, 100 Mbit/s offered for 10 s.
        let mut p = Policer::new(limit(10, None, 100_000), Duration::ZERO);
        let gap = Duration::from_nanos(120_000);
        let bytes = offer(&mut p, gap, Duration::from_secs(10));
        let rate = bytes as f64 * 8.0 / 10.0;
        assert!((rate / 10e6 - 1.0).abs() < 0.02, "{rate} bit/s");
        assert!(p.counters().dropped_frames > 0);
    }

    #[test]
    fn a_burst_bonus_is_spent_no_faster_than_the_peak() {
        // avg 10, peak 20 Mbit/s, 1 MB burst: from rest, 50 Mbit/s offered
        // runs at the peak until the bonus is gone.
        let mut p = Policer::new(limit(10, Some(20), 1 << 20), Duration::ZERO);
        let gap = Duration::from_nanos(240_000);
        let first = offer(&mut p, gap, Duration::from_millis(500));
        // The peak rate, plus the peak bucket's one frame of head start.
        let want = 20e6 * 0.5 + PEAK_BUCKET * 8.0;
        let got = first as f64 * 8.0;
        assert!(
            (got / want - 1.0).abs() < 0.05,
            "burst sent {got} bits, want {want}"
        );
    }

    #[test]
    fn a_large_frame_passes_a_small_bucket_and_is_paid_back() {
        let mut p = Policer::new(limit(1, None, 1500), Duration::ZERO);
        assert!(p.admit(Duration::ZERO, 65_000), "one GSO frame may pass");
        assert!(
            !p.admit(Duration::from_millis(100), 1500),
            "then the debt is paid first"
        );
        assert!(p.admit(Duration::from_millis(600), 1500));
    }

    #[test]
    fn a_shaper_says_when_to_take_the_next_frame() {
        // 8 Mbit/s = 1 MB/s, 10 kB burst.
        let mut s = Policer::new(limit(8, None, 10_000), Duration::ZERO);
        assert_eq!(s.wait(Duration::ZERO), None);
        s.charge(Duration::ZERO, 30_000);
        let w = s.wait(Duration::ZERO).unwrap();
        assert!((w.as_secs_f64() - 0.020).abs() < 0.001, "{w:?}");
        assert_eq!(s.wait(Duration::from_millis(21)), None);
        // Taken at that pace, frames leave at the average rate.
        let mut t = Duration::from_millis(21);
        let mut sent = 0u64;
        while t < Duration::from_secs(2) {
            match s.wait(t) {
                None => {
                    s.charge(t, 1500);
                    sent += 1500;
                }
                Some(w) => t += w,
            }
        }
        let rate = sent as f64 / (2.0 - 0.021);
        assert!((rate / 1e6 - 1.0).abs() < 0.02, "{rate} B/s");
    }

    #[test]
    fn a_restored_policer_continues_where_it_stopped() {
        let mut p = Policer::new(limit(1, None, 100_000), Duration::ZERO);
        assert!(p.admit(Duration::ZERO, 150_000), "one big frame into debt");
        let state = p.save(Duration::from_millis(10));
        // Elsewhere, on a clock that reads 500 s.
        let mut q = Policer::new(limit(1, None, 100_000), Duration::from_secs(500));
        q.restore(&state, Duration::from_secs(500));
        assert!(
            !q.admit(Duration::from_secs(500), 1500),
            "the debt came along"
        );
        assert_eq!(q.counters().passed_bytes, 150_000);
    }

    proptest! {
        /// Over any run, what passes never exceeds burst + rate × time plus
        /// one frame of debt.
        #[test]
        fn never_exceeds_rate_and_burst(
            gaps in proptest::collection::vec(0u64..2_000_000, 1..300),
            lens in proptest::collection::vec(60usize..9000, 1..300),
            avg_mbps in 1u64..100, burst in 1500u64..200_000,
        ) {
            let mut p = Policer::new(limit(avg_mbps, None, burst), Duration::ZERO);
            let mut t = Duration::ZERO;
            let mut passed = 0u64;
            let mut biggest = 0u64;
            for (g, l) in gaps.iter().zip(lens.iter().cycle()) {
                t += Duration::from_nanos(*g);
                if p.admit(t, *l) {
                    passed += *l as u64;
                    biggest = biggest.max(*l as u64);
                }
            }
            let allowed = burst as f64 + avg_mbps as f64 * 1e6 / 8.0 * t.as_secs_f64() + biggest as f64;
            prop_assert!(passed as f64 <= allowed + 1.0, "{} > {}", passed, allowed);
        }
    }
}
