//! NetFlow monitors: where a port's flow records go, and how they are cut.
//!
//! ```yaml
//! kind: NetflowMonitor
//! name: default
//! version: ipfix            # v5 | v9 | ipfix (also 5, 9, 10)
//! collectors: [ "127.0.0.1:4739" ]
//! active_timeout_s: 60      # a long flow is exported this often
//! inactive_timeout_s: 15    # a flow idle this long ends
//! sampling: 1               # count 1 packet in N (1: all)
//! max_flows: 65536          # open records kept; the oldest is evicted past it
//! template_refresh_s: 30    # v9/IPFIX templates are re-sent this often
//! ```
//!
//! A profile (or a port) takes a monitor by name:
//! `netflow: { monitor: default, direction: both }` — `in` records traffic
//! into the VM, `out` what it sends, `both` (the default) both, as the
//! profile's access lists read.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::Error;

/// The export format of a monitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlowVersion {
    /// NetFlow v5: IPv4 only, fixed records, 16-bit interfaces, no VLAN.
    V5,
    /// NetFlow v9 (RFC 3954).
    V9,
    /// IPFIX (RFC 7011), NetFlow's version 10.
    Ipfix,
}

impl FlowVersion {
    /// The version number in the export header.
    pub fn number(self) -> u16 {
        match self {
            FlowVersion::V5 => 5,
            FlowVersion::V9 => 9,
            FlowVersion::Ipfix => 10,
        }
    }
}

impl std::fmt::Display for FlowVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FlowVersion::V5 => "v5",
            FlowVersion::V9 => "v9",
            FlowVersion::Ipfix => "ipfix",
        })
    }
}

/// Which of a port's traffic a monitor records, seen from the VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum FlowDirection {
    /// Traffic into the VM.
    In,
    /// Traffic the VM sends.
    Out,
    #[default]
    Both,
}

impl FlowDirection {
    pub fn records_in(self) -> bool {
        matches!(self, FlowDirection::In | FlowDirection::Both)
    }

    pub fn records_out(self) -> bool {
        matches!(self, FlowDirection::Out | FlowDirection::Both)
    }
}

/// A validated monitor.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NetflowMonitor {
    pub name: String,
    pub version: FlowVersion,
    /// Every export packet goes to each.
    pub collectors: Vec<SocketAddr>,
    pub active_timeout: Duration,
    pub inactive_timeout: Duration,
    /// 1 in `sampling` packets is counted (1: all).
    pub sampling: u32,
    pub max_flows: usize,
    pub template_refresh: Duration,
}

/// The largest sampling interval: NetFlow v5's header has 14 bits for it.
pub const MAX_SAMPLING: u32 = 16_383;
/// The most open flow records one monitor may keep.
pub const MAX_FLOWS: usize = 16 << 20;
/// The most collectors per monitor.
pub const MAX_COLLECTORS: usize = 16;
const MAX_TIMEOUT_S: u64 = 86_400;

/// A version as written: a name or a number.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawVersion {
    Number(u64),
    Name(String),
}

/// A monitor document as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMonitor {
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    pub version: RawVersion,
    pub collectors: Vec<String>,
    #[serde(default)]
    pub active_timeout_s: Option<u64>,
    #[serde(default)]
    pub inactive_timeout_s: Option<u64>,
    #[serde(default)]
    pub sampling: Option<u64>,
    #[serde(default)]
    pub max_flows: Option<u64>,
    #[serde(default)]
    pub template_refresh_s: Option<u64>,
}

/// A profile's or port's `netflow:` line as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNetflow {
    pub monitor: String,
    #[serde(default)]
    pub direction: Option<String>,
}

/// A validated `netflow:` line: the monitor's name (checked against the
/// monitors known where it is used) and the direction.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NetflowBinding {
    pub monitor: String,
    pub direction: FlowDirection,
}

impl NetflowBinding {
    /// Validate `raw`; `at` names the profile or port.
    ///
    /// # Errors
    /// [`Error::Rule`] for an empty monitor name or an unknown direction.
    pub fn from_raw(raw: &RawNetflow, at: &str) -> Result<Self, Error> {
        let bad = |field: &str, msg: String| Error::Rule {
            at: at.to_string(),
            field: format!("netflow.{field}"),
            msg,
        };
        if raw.monitor.trim().is_empty() {
            return Err(bad("monitor", "the monitor name is empty".into()));
        }
        let direction = match raw.direction.as_deref() {
            None | Some("both") => FlowDirection::Both,
            Some("in") => FlowDirection::In,
            Some("out") => FlowDirection::Out,
            Some(d) => {
                return Err(bad(
                    "direction",
                    format!("`{d}` is not a direction: expected in, out or both"),
                ))
            }
        };
        Ok(NetflowBinding {
            monitor: raw.monitor.clone(),
            direction,
        })
    }
}

impl NetflowMonitor {
    /// Validate a monitor document.
    ///
    /// # Errors
    /// [`Error::Rule`] naming the monitor and the field: a kind other than
    /// NetflowMonitor, an unknown version (NetFlow v7, say), no collector or
    /// one that is not `IP:PORT`, a zero timeout or sampling interval.
    pub fn from_raw(raw: &RawMonitor) -> Result<Self, Error> {
        let at = format!("monitor `{}`", raw.name);
        let bad = |field: &str, msg: String| Error::Rule {
            at: at.clone(),
            field: field.to_string(),
            msg,
        };
        if let Some(k) = raw.kind.as_deref().filter(|k| *k != "NetflowMonitor") {
            return Err(bad(
                "kind",
                format!("`{k}` is not a monitor's kind: expected NetflowMonitor"),
            ));
        }
        if raw.name.trim().is_empty() {
            return Err(bad("name", "the monitor name is empty".into()));
        }
        let version = match &raw.version {
            RawVersion::Number(5) => FlowVersion::V5,
            RawVersion::Number(9) => FlowVersion::V9,
            RawVersion::Number(10) => FlowVersion::Ipfix,
            RawVersion::Name(n) if matches!(n.as_str(), "v5" | "5") => FlowVersion::V5,
            RawVersion::Name(n) if matches!(n.as_str(), "v9" | "9") => FlowVersion::V9,
            RawVersion::Name(n) if matches!(n.as_str(), "ipfix" | "v10" | "10") => {
                FlowVersion::Ipfix
            }
            v => {
                let shown = match v {
                    RawVersion::Number(n) => n.to_string(),
                    RawVersion::Name(n) => n.clone(),
                };
                return Err(bad(
                    "version",
                    format!(
                        "`{shown}` is not an export format dvs speaks: expected v5, v9 or ipfix"
                    ),
                ));
            }
        };
        if raw.collectors.is_empty() {
            return Err(bad(
                "collectors",
                "no collector: give at least one IP:PORT (e.g. [\"127.0.0.1:2055\"])".into(),
            ));
        }
        if raw.collectors.len() > MAX_COLLECTORS {
            return Err(bad(
                "collectors",
                format!(
                    "{} collectors: a monitor sends to at most {MAX_COLLECTORS}",
                    raw.collectors.len()
                ),
            ));
        }
        let mut collectors = Vec::new();
        for (i, c) in raw.collectors.iter().enumerate() {
            let addr: SocketAddr = c.parse().map_err(|_| {
                bad(
                    &format!("collectors[{i}]"),
                    format!("`{c}` is not a collector address: expected IP:PORT like 127.0.0.1:2055 or [2001:db8::1]:4739"),
                )
            })?;
            if addr.port() == 0 || addr.ip().is_unspecified() || addr.ip().is_multicast() {
                return Err(bad(
                    &format!("collectors[{i}]"),
                    format!("`{c}` cannot receive exports: give a unicast address and a port other than 0"),
                ));
            }
            collectors.push(addr);
        }
        let secs = |field: &str, v: Option<u64>, default: u64| match v.unwrap_or(default) {
            0 => Err(bad(
                field,
                format!("0 is not valid: use 1..={MAX_TIMEOUT_S} seconds"),
            )),
            s if s > MAX_TIMEOUT_S => Err(bad(
                field,
                format!("{s} is too long: use 1..={MAX_TIMEOUT_S} seconds"),
            )),
            s => Ok(Duration::from_secs(s)),
        };
        let sampling = match raw.sampling.unwrap_or(1) {
            s @ 1..=16_383 => s as u32,
            s => {
                return Err(bad(
                    "sampling",
                    format!("{s} is not valid: count 1 packet in N with N in 1..={MAX_SAMPLING} (1: every packet)"),
                ))
            }
        };
        let max_flows = match raw.max_flows.unwrap_or(65_536) {
            n @ 1.. if n <= MAX_FLOWS as u64 => n as usize,
            n => {
                return Err(bad(
                    "max_flows",
                    format!("{n} is not valid: use 1..={MAX_FLOWS}"),
                ))
            }
        };
        Ok(NetflowMonitor {
            name: raw.name.clone(),
            version,
            collectors,
            active_timeout: secs("active_timeout_s", raw.active_timeout_s, 60)?,
            inactive_timeout: secs("inactive_timeout_s", raw.inactive_timeout_s, 15)?,
            sampling,
            max_flows,
            template_refresh: secs("template_refresh_s", raw.template_refresh_s, 30)?,
        })
    }

    /// Validate a set of monitor documents; names must differ.
    ///
    /// # Errors
    /// The first invalid monitor, or a name used twice.
    pub fn set_from_raw(
        raws: &[RawMonitor],
    ) -> Result<std::collections::BTreeMap<String, NetflowMonitor>, Error> {
        let mut out = std::collections::BTreeMap::new();
        for r in raws {
            let m = NetflowMonitor::from_raw(r)?;
            if out.insert(m.name.clone(), m).is_some() {
                return Err(Error::Rule {
                    at: format!("monitor `{}`", r.name),
                    field: "name".into(),
                    msg: "another monitor has this name".into(),
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn monitor(yaml: &str) -> Result<NetflowMonitor, String> {
        let raw: RawMonitor = serde_norway::from_str(yaml).map_err(|e| e.to_string())?;
        NetflowMonitor::from_raw(&raw).map_err(|e| e.to_string())
    }

    #[test]
    fn a_monitor_takes_defaults_and_names_its_version_either_way() {
        let m = monitor(
            "{ kind: NetflowMonitor, name: m, version: ipfix, collectors: [\"127.0.0.1:4739\"] }",
        )
        .unwrap();
        assert_eq!(m.version, FlowVersion::Ipfix);
        assert_eq!(m.active_timeout, Duration::from_secs(60));
        assert_eq!(m.inactive_timeout, Duration::from_secs(15));
        assert_eq!((m.sampling, m.max_flows), (1, 65_536));
        for (v, want) in [
            ("5", FlowVersion::V5),
            ("v9", FlowVersion::V9),
            ("10", FlowVersion::Ipfix),
        ] {
            let m = monitor(&format!(
                "{{ name: m, version: {v}, collectors: [\"[::1]:2055\"] }}"
            ))
            .unwrap();
            assert_eq!(m.version, want);
        }
    }

    #[test]
    fn bad_monitors_are_rejected_naming_the_field() {
        let e = |y: &str| monitor(y).unwrap_err();
        assert_eq!(
            e("{ name: m, version: 7, collectors: [\"127.0.0.1:2055\"] }"),
            "monitor `m`, version: `7` is not an export format dvs speaks: expected v5, v9 or ipfix"
        );
        assert_eq!(
            e("{ name: m, version: v9, collectors: [\"127.0.0.1:2055\", \"collector:2055\"] }"),
            "monitor `m`, collectors[1]: `collector:2055` is not a collector address: expected IP:PORT like 127.0.0.1:2055 or [2001:db8::1]:4739"
        );
        assert!(e("{ name: m, version: v9, collectors: [\"10.0.0.1\"] }")
            .contains("collectors[0]: `10.0.0.1` is not a collector address"));
        assert!(
            e("{ name: m, version: v9, collectors: [\"0.0.0.0:2055\"] }")
                .contains("cannot receive exports")
        );
        assert!(e("{ name: m, version: v9, collectors: [] }").contains("collectors: no collector"));
        assert_eq!(
            e("{ name: m, version: v9, collectors: [\"127.0.0.1:2055\"], active_timeout_s: 0 }"),
            "monitor `m`, active_timeout_s: 0 is not valid: use 1..=86400 seconds"
        );
        assert!(e(
            "{ name: m, version: v9, collectors: [\"127.0.0.1:2055\"], inactive_timeout_s: 0 }"
        )
        .starts_with("monitor `m`, inactive_timeout_s: 0 is not valid"));
        assert!(
            e("{ name: m, version: v9, collectors: [\"127.0.0.1:2055\"], sampling: 0 }")
                .starts_with("monitor `m`, sampling: 0 is not valid")
        );
        assert!(
            e("{ kind: PortProfile, name: m, version: v9, collectors: [\"127.0.0.1:2055\"] }")
                .contains("expected NetflowMonitor")
        );
        assert!(
            e("{ name: m, version: v9, collectors: [\"127.0.0.1:2055\"], timeout: 3 }")
                .contains("unknown field `timeout`")
        );
    }

    #[test]
    fn a_binding_names_its_direction() {
        let b = |y: &str| {
            let raw: RawNetflow = serde_norway::from_str(y).unwrap();
            NetflowBinding::from_raw(&raw, "profile `p`").map_err(|e| e.to_string())
        };
        assert_eq!(b("{ monitor: m }").unwrap().direction, FlowDirection::Both);
        assert_eq!(
            b("{ monitor: m, direction: in }").unwrap().direction,
            FlowDirection::In
        );
        assert_eq!(
            b("{ monitor: m, direction: sideways }").unwrap_err(),
            "profile `p`, netflow.direction: `sideways` is not a direction: expected in, out or both"
        );
    }
}
