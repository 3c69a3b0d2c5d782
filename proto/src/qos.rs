//! Rate limits, as admins write them in port profiles, validated.
//!
//! ```yaml
//! qos:
//!   in:  { avg_mbps: 100, peak_mbps: 200, burst_kb: 512 }   # into the VM
//!   out: { avg_mbps: 100 }                                  # from the VM
//! ```
//!
//! The semantics are vSphere's traffic shaping: traffic may run at the
//! average rate indefinitely; a port that stayed below it gathers a burst
//! bonus of up to `burst_kb`, which it may spend at up to the peak rate.

use serde::Deserialize;

use crate::Error;

/// A validated rate limit, in bits and bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RateLimit {
    /// Average rate, bits per second (> 0).
    pub avg_bps: u64,
    /// Peak rate, bits per second (≥ `avg_bps`); `None`: no peak limit.
    pub peak_bps: Option<u64>,
    /// Burst bonus, bytes.
    pub burst_bytes: u64,
    /// Shape instead of police: hold frames back until they conform rather
    /// than drop them (for what a VM sends: the switch stops reading its
    /// NIC, and the VM's own queue waits; into a VM, frames wait in a
    /// queue of `queue_bytes` in the switch).
    pub shape: bool,
    /// The most bytes a shaper into a VM holds back.
    pub queue_bytes: u64,
}

/// A rate limit as written in a file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub avg_mbps: f64,
    #[serde(default)]
    pub peak_mbps: Option<f64>,
    #[serde(default)]
    pub burst_kb: Option<f64>,
    #[serde(default)]
    pub shape: bool,
    #[serde(default)]
    pub queue_kb: Option<f64>,
}

/// Priority marks set on what a VM sends: DSCP in its IP header, 802.1p PCP
/// in the tag of tagged copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Marking {
    /// 0..=63.
    pub dscp: Option<u8>,
    /// 0..=7.
    pub pcp: Option<u8>,
}

/// Marks as written: `mark: { dscp: 26, pcp: 3 }`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMarking {
    #[serde(default)]
    pub dscp: Option<u64>,
    #[serde(default)]
    pub pcp: Option<u64>,
}

impl Marking {
    /// Validate `raw`; `at` names it in errors (e.g. "qos.mark").
    ///
    /// # Errors
    /// [`Error::Rule`] naming the field and its valid range.
    pub fn from_raw(raw: &RawMarking, at: &str) -> Result<Self, Error> {
        let field = |name: &str, v: Option<u64>, max: u8| -> Result<Option<u8>, Error> {
            match v {
                None => Ok(None),
                Some(v) if v <= u64::from(max) => Ok(Some(v as u8)),
                Some(v) => Err(Error::Rule {
                    at: at.to_string(),
                    field: name.to_string(),
                    msg: format!("{v} is out of range 0..={max}"),
                }),
            }
        };
        Ok(Marking {
            dscp: field("dscp", raw.dscp, 63)?,
            pcp: field("pcp", raw.pcp, 7)?,
        })
    }
}

/// Burst bonus when the file gives none: 100 ms at the average rate, at
/// least 64 KB (one GSO frame).
fn default_burst(avg_bps: u64) -> u64 {
    (avg_bps / 8 / 10).max(64 * 1024)
}

impl RateLimit {
    /// Validate `raw`; `at` names it in errors (e.g. "qos.in").
    ///
    /// # Errors
    /// [`Error::Rule`] naming the field and what would be valid.
    pub fn from_raw(raw: &RawRateLimit, at: &str) -> Result<Self, Error> {
        let bad = |field: &str, msg: String| Error::Rule {
            at: at.to_string(),
            field: field.to_string(),
            msg,
        };
        let mbps = |field: &str, v: f64| -> Result<u64, Error> {
            if !v.is_finite() || v <= 0.0 || v > 1_000_000.0 {
                return Err(bad(
                    field,
                    format!("{v} is not a rate: expected Mbit/s in (0, 1000000]"),
                ));
            }
            Ok((v * 1e6).round() as u64)
        };
        let avg_bps = mbps("avg_mbps", raw.avg_mbps)?;
        let peak_bps = raw.peak_mbps.map(|p| mbps("peak_mbps", p)).transpose()?;
        if let Some(p) = peak_bps {
            if p < avg_bps {
                return Err(bad(
                    "peak_mbps",
                    format!(
                        "peak {} Mbit/s is below the average {} Mbit/s: the peak must be at least the average",
                        raw.peak_mbps.unwrap_or_default(),
                        raw.avg_mbps
                    ),
                ));
            }
        }
        let burst_bytes = match raw.burst_kb {
            None => default_burst(avg_bps),
            Some(kb) if kb.is_finite() && kb > 0.0 && kb <= 1_048_576.0 => (kb * 1024.0) as u64,
            Some(kb) => {
                return Err(bad(
                    "burst_kb",
                    format!("{kb} is not a burst size: expected KB in (0, 1048576]"),
                ))
            }
        };
        let queue_bytes = match raw.queue_kb {
            None => 512 * 1024,
            Some(kb) if raw.shape && (64.0..=65_536.0).contains(&kb) => (kb * 1024.0) as u64,
            Some(_) if !raw.shape => {
                return Err(bad("queue_kb", "a queue needs `shape: true`".into()))
            }
            Some(kb) => {
                return Err(bad(
                    "queue_kb",
                    format!("{kb} is not a queue size: expected KB in [64, 65536]"),
                ))
            }
        };
        Ok(RateLimit {
            avg_bps,
            peak_bps,
            burst_bytes,
            shape: raw.shape,
            queue_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(yaml: &str) -> Result<RateLimit, Error> {
        let raw: RawRateLimit = serde_norway::from_str(yaml).unwrap();
        RateLimit::from_raw(&raw, "qos.in")
    }

    #[test]
    fn limits_parse_with_vsphere_fields() {
        let l = limit("{ avg_mbps: 100, peak_mbps: 200, burst_kb: 512 }").unwrap();
        assert_eq!(
            (l.avg_bps, l.peak_bps, l.burst_bytes),
            (100_000_000, Some(200_000_000), 512 * 1024)
        );
        let l = limit("{ avg_mbps: 0.5 }").unwrap();
        assert_eq!(
            (l.avg_bps, l.peak_bps, l.burst_bytes),
            (500_000, None, 64 * 1024)
        );
    }

    #[test]
    fn marks_are_checked() {
        let m = |y: &str| {
            let raw: RawMarking = serde_norway::from_str(y).unwrap();
            Marking::from_raw(&raw, "qos.mark")
        };
        assert_eq!(
            m("{ dscp: 26, pcp: 3 }").unwrap(),
            Marking {
                dscp: Some(26),
                pcp: Some(3)
            }
        );
        assert_eq!(
            m("{ dscp: 64 }").unwrap_err().to_string(),
            "qos.mark, dscp: 64 is out of range 0..=63"
        );
        assert_eq!(
            m("{ pcp: 8 }").unwrap_err().to_string(),
            "qos.mark, pcp: 8 is out of range 0..=7"
        );
    }

    #[test]
    fn bad_limits_name_the_field() {
        let e = limit("{ avg_mbps: 100, peak_mbps: 50 }")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "qos.in, peak_mbps: peak 50 Mbit/s is below the average 100 Mbit/s: the peak must be at least the average"
        );
        let e = limit("{ avg_mbps: 0 }").unwrap_err().to_string();
        assert!(e.starts_with("qos.in, avg_mbps: 0 is not a rate"), "{e}");
        let e = limit("{ avg_mbps: 10, burst_kb: -1 }")
            .unwrap_err()
            .to_string();
        assert!(e.contains("burst_kb: -1 is not a burst size"), "{e}");
    }
}
