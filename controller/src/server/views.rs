//! What the admin service and the metrics endpoint show: ports with their
//! hosts' last reports, hosts with their convergence lag, documents, and
//! the Prometheus text.

use dvs_proto::api;
use std::collections::BTreeMap;

use dvs_proto::stats::{Attachment, Stats};

use super::{Controller, State};
use crate::chassis::{Attach, Chassis, Kind, PortRec};

impl Controller {
    pub(super) fn port_view(&self, st: &State, p: &PortRec) -> api::Port {
        let (host, tap, netdev) = match &p.binding {
            Some(b) => match &b.attach {
                Attach::Tap(t) => (b.host.clone(), t.clone(), String::new()),
                Attach::Netdev(n) => (b.host.clone(), String::new(), n.clone()),
                Attach::Unnamed => (b.host.clone(), String::new(), String::new()),
            },
            None => Default::default(),
        };
        let id = p.id.to_string();
        let stats = st
            .reports
            .get(&host)
            .and_then(|r| r.ports.iter().find(|x| x.id == id));
        let connected = st.sessions.contains_key(&host);
        let attachment = stats
            .and_then(|s| s.attachment.as_ref())
            .map(|a| a.detail.clone())
            .unwrap_or_default();
        let attached = stats.is_some_and(|s| {
            s.attachment
                .as_ref()
                .is_none_or(|a| matches!(a.state, Attachment::Attached { .. }))
        });
        let state = match (&p.binding, stats, connected) {
            (None, ..) => api::PortState::Unbound,
            (Some(_), Some(_), true) if attached => api::PortState::Up,
            (Some(_), Some(_), true) => api::PortState::Waiting,
            (Some(_), _, false) => api::PortState::HostDown,
            (Some(_), ..) => api::PortState::Pending,
        };
        let vlan = st
            .chassis
            .policy(&p.profile)
            .and_then(|x| x.vlan.as_ref())
            .map(dvs_proto::VlanMode::summary)
            .unwrap_or_default();
        api::Port {
            id: p.id.to_string(),
            vm: p.vm.clone(),
            mac: p.mac.to_string(),
            profile: p.profile.clone(),
            profile_version: st
                .chassis
                .doc(Kind::PortProfile, &p.profile)
                .map_or(0, |d| d.version),
            host,
            tap,
            netdev,
            state: state as i32,
            vlan,
            stats_json: stats
                .and_then(|s| serde_json::to_string(s).ok())
                .unwrap_or_default(),
            attachment,
            ips: p.ips.iter().map(ToString::to_string).collect(),
        }
    }

    pub(super) fn host_views(&self, st: &State) -> Vec<api::Host> {
        let now = self.now();
        st.chassis
            .hosts()
            .map(|h| {
                // Lag: how long the oldest revision the host has not yet
                // applied has been waiting.
                let lag = if h.acked >= h.desired {
                    0.0
                } else {
                    st.revised
                        .range(h.acked + 1..)
                        .next()
                        .map_or(0.0, |(_, t)| now.saturating_sub(*t).as_secs_f64())
                };
                api::Host {
                    name: h.name.clone(),
                    module: h.module,
                    tunnel_ip: h.tunnel_ip.map(|i| i.to_string()).unwrap_or_default(),
                    connected: st.sessions.contains_key(&h.name),
                    desired_revision: h.desired,
                    acked_revision: h.acked,
                    lag_seconds: lag,
                    ports: st.chassis.host_port_count(&h.name) as u32,
                    draining: h.draining,
                }
            })
            .collect()
    }

    /// Prometheus metrics: the chassis revision, every host's connection,
    /// revisions and convergence lag, ports by state, and the counters and
    /// drops by reason that each host last reported.
    pub fn metrics(&self) -> String {
        use dvs_metrics::{family, sample};
        let st = self.lock();
        let mut o = String::new();
        family(
            &mut o,
            "dvs_chassis_revision",
            "gauge",
            "The chassis configuration revision.",
        );
        sample(
            &mut o,
            "dvs_chassis_revision",
            &[],
            st.chassis.revision() as f64,
        );
        let hosts = self.host_views(&st);
        for (name, help) in [
            (
                "dvs_host_connected",
                "1 while the host's agent has a session.",
            ),
            (
                "dvs_host_desired_revision",
                "The revision of the host's last change.",
            ),
            (
                "dvs_host_acked_revision",
                "The revision the host says it runs.",
            ),
            (
                "dvs_host_convergence_lag_seconds",
                "How long the host's oldest unapplied change has waited.",
            ),
            ("dvs_host_ports", "Ports bound to the host."),
        ] {
            family(&mut o, name, "gauge", help);
            for h in &hosts {
                let v = match name {
                    "dvs_host_connected" => f64::from(u8::from(h.connected)),
                    "dvs_host_desired_revision" => h.desired_revision as f64,
                    "dvs_host_acked_revision" => h.acked_revision as f64,
                    "dvs_host_convergence_lag_seconds" => h.lag_seconds,
                    _ => f64::from(h.ports),
                };
                sample(
                    &mut o,
                    name,
                    &[("host", &h.name), ("module", &h.module.to_string())],
                    v,
                );
            }
        }
        let mut states: BTreeMap<&str, u64> = BTreeMap::new();
        for p in st.chassis.ports() {
            *states
                .entry(self.port_view(&st, p).state().name())
                .or_default() += 1;
        }
        family(
            &mut o,
            "dvs_ports",
            "gauge",
            "Ports of the chassis, by state.",
        );
        for (s, n) in states {
            sample(&mut o, "dvs_ports", &[("state", s)], n as f64);
        }
        let reports: Vec<(&Stats, Option<u64>)> = st
            .reports
            .iter()
            .map(|(h, r)| (r, st.chassis.host(h).map(|x| x.acked)))
            .collect();
        o.push_str(&dvs_metrics::agents(&reports));
        o
    }
}

pub(super) fn doc_view(c: &Chassis, d: &crate::chassis::Doc) -> api::Profile {
    api::Profile {
        kind: d.kind.name().into(),
        name: d.name.clone(),
        version: d.version,
        yaml: serde_norway::to_string(&d.body).unwrap_or_default(),
        ports: c
            .ports()
            .filter(|p| d.kind == Kind::PortProfile && p.profile == d.name)
            .map(|p| p.id.to_string())
            .collect(),
    }
}
