//! Prometheus text exposition (format 0.0.4) for agents and the
//! controller: a tiny HTTP/1.1 responder on its own thread that answers
//! every GET with the text a closure renders, and an agent's metrics from
//! its [`Stats`] — the type every side shares, so that a renamed counter
//! fails to compile here rather than vanishing from a dashboard.
//!
//! What this crate must not do: know the datapath or the chassis; it reads
//! `dvs_proto::stats` and writes text.

#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::thread::JoinHandle;
use std::time::Duration;

use dvs_proto::stats::{Attachment, DropCounters, Stats};

/// Serve `render()` at `addr` (any path) until the process ends.
///
/// # Errors
/// The address cannot be bound.
pub fn serve(
    addr: SocketAddr,
    render: impl Fn() -> String + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    let l = TcpListener::bind(addr)?;
    std::thread::Builder::new()
        .name("dvs-metrics".into())
        .spawn(move || {
            for conn in l.incoming() {
                let Ok(mut s) = conn else { continue };
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 2048];
                let n = s.read(&mut buf).unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]);
                let (status, body) = if head.starts_with("GET ") {
                    ("200 OK", render())
                } else {
                    ("405 Method Not Allowed", "only GET\n".to_string())
                };
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        })
}

/// Append one sample `name{labels} value`.
pub fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            let _ = write!(out, "{k}=\"{v}\"");
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// Append the HELP and TYPE lines of a family.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Metric families being gathered: each declared once, samples from any
/// number of hosts.
#[derive(Debug, Default)]
struct Families {
    order: Vec<&'static str>,
    fams: std::collections::HashMap<&'static str, (&'static str, &'static str, String)>,
}

impl Families {
    fn add(
        &mut self,
        name: &'static str,
        kind: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
        v: f64,
    ) {
        let e = self.fams.entry(name).or_insert_with(|| {
            self.order.push(name);
            (kind, help, String::new())
        });
        sample(&mut e.2, name, labels, v);
    }

    fn render(self) -> String {
        let mut o = String::new();
        for name in &self.order {
            if let Some((kind, help, samples)) = self.fams.get(name) {
                family(&mut o, name, kind, help);
                o.push_str(samples);
            }
        }
        o
    }
}

/// The metrics of agents from their stats, each with the controller
/// revision it runs when it has a controller.
pub fn agents(hosts: &[(&Stats, Option<u64>)]) -> String {
    let mut f = Families::default();
    for (stats, revision) in hosts {
        agent_into(&mut f, stats, *revision);
    }
    f.render()
}

/// One agent's metrics (see [`agents`]).
pub fn agent(stats: &Stats, revision: Option<u64>) -> String {
    agents(&[(stats, revision)])
}

fn agent_into(f: &mut Families, stats: &Stats, revision: Option<u64>) {
    let host = stats.host.as_str();
    if let Some(r) = revision {
        f.add(
            "dvs_agent_revision",
            "gauge",
            "The controller revision this host runs.",
            &[("host", host)],
            r as f64,
        );
    }
    ports_into(f, host, &stats.ports);
    tunnel_and_macs_into(f, stats);
    netflow_into(f, host, &stats.netflow);
}

/// The ports' counters, drops by reason and attachment.
fn ports_into(f: &mut Families, host: &str, ports: &[dvs_proto::stats::PortStats]) {
    f.add(
        "dvs_ports_on_host",
        "gauge",
        "Ports on the host.",
        &[("host", host)],
        ports.len() as f64,
    );
    type Counter = fn(&dvs_proto::stats::PortCounters) -> u64;
    let totals: [(&'static str, Counter, &'static str); 4] = [
        (
            "dvs_port_rx_frames_total",
            |c| c.rx_frames,
            "Frames from the VM.",
        ),
        (
            "dvs_port_rx_bytes_total",
            |c| c.rx_bytes,
            "Bytes from the VM.",
        ),
        (
            "dvs_port_tx_frames_total",
            |c| c.tx_frames,
            "Frames to the VM.",
        ),
        (
            "dvs_port_tx_bytes_total",
            |c| c.tx_bytes,
            "Bytes to the VM.",
        ),
    ];
    for (name, get, help) in totals {
        for p in ports {
            f.add(
                name,
                "counter",
                help,
                &[("host", host), ("port", &p.id), ("name", &p.name)],
                get(&p.counters) as f64,
            );
        }
    }
    type Drops = fn(&dvs_proto::stats::PortCounters) -> &DropCounters;
    let drops: [(&'static str, Drops, &'static str); 2] = [
        (
            "dvs_port_drops_total",
            |c| &c.drops,
            "Frames from the VM dropped, by reason.",
        ),
        (
            "dvs_port_tx_drops_total",
            |c| &c.tx_drops,
            "Frames to the VM dropped, by reason.",
        ),
    ];
    for (name, get, help) in drops {
        for p in ports {
            for (reason, n) in get(&p.counters).nonzero() {
                f.add(
                    name,
                    "counter",
                    help,
                    &[("host", host), ("port", &p.id), ("reason", reason)],
                    n as f64,
                );
            }
        }
    }
    for p in ports {
        if let Some(a) = &p.attachment {
            let (state, device) = match &a.state {
                Attachment::Attached { device, .. } => ("attached", device.as_str()),
                Attachment::Waiting { device } => ("waiting", device.as_deref().unwrap_or("")),
                Attachment::Gone { device } => ("gone", device.as_str()),
                Attachment::Failed { device, .. } => ("failed", device.as_str()),
            };
            f.add(
                "dvs_port_attached",
                "gauge",
                "1 when the port's interface is attached; 0 while it waits for it (state: waiting, gone, failed).",
                &[("host", host), ("port", &p.id), ("device", device), ("state", state)],
                if state == "attached" { 1.0 } else { 0.0 },
            );
        }
    }
}

/// The VXLAN uplink and the MAC table.
fn tunnel_and_macs_into(f: &mut Families, stats: &Stats) {
    let host = stats.host.as_str();
    let t = &stats.tunnel;
    for (name, v) in [
        ("dvs_tunnel_rx_packets_total", t.rx_packets),
        ("dvs_tunnel_tx_packets_total", t.tx_packets),
    ] {
        f.add(
            name,
            "counter",
            "VXLAN packets.",
            &[("host", host)],
            v as f64,
        );
    }
    for (reason, n) in t.drops.nonzero() {
        f.add(
            "dvs_tunnel_drops_total",
            "counter",
            "VXLAN packets dropped, by reason.",
            &[("host", host), ("reason", reason)],
            n as f64,
        );
    }
    f.add(
        "dvs_mac_entries",
        "gauge",
        "Entries in the MAC table.",
        &[("host", host)],
        stats.mac_entries as f64,
    );
    let m = &stats.mac;
    for (name, v, help) in [
        (
            "dvs_mac_moves_total",
            m.moves,
            "MAC table entries that moved to another port or host.",
        ),
        (
            "dvs_mac_flaps_total",
            m.flaps,
            "MAC table entries that began to flap (held where they were).",
        ),
        (
            "dvs_mac_learning_refused_total",
            m.table_full + m.peer_full + m.move_held + m.owned_refused,
            "Learning refused: table full, a tunnel endpoint at its bound, a flapping entry, or a local port's own MAC seen elsewhere.",
        ),
    ] {
        f.add(name, "counter", help, &[("host", host)], v as f64);
    }
}

/// Each NetFlow monitor's table and exporter.
fn netflow_into(f: &mut Families, host: &str, monitors: &[dvs_proto::stats::MonitorStats]) {
    for m in monitors {
        let labels = [("host", host), ("monitor", m.name.as_str())];
        f.add(
            "dvs_netflow_open_flows",
            "gauge",
            "Open flow records.",
            &labels,
            m.open_flows as f64,
        );
        f.add(
            "dvs_netflow_records_total",
            "counter",
            "Flow records exported.",
            &labels,
            m.export.records as f64,
        );
        f.add(
            "dvs_netflow_send_errors_total",
            "counter",
            "Export sends that failed.",
            &labels,
            m.export.send_errors as f64,
        );
        f.add(
            "dvs_netflow_evicted_total",
            "counter",
            "Records forced out of a full table.",
            &labels,
            m.flows.evicted as f64,
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn agent_metrics_name_ports_and_drop_reasons() {
        let stats = serde_json::json!({
            "host": "h1",
            "ports": [{ "id": "veth1", "name": "web\"1", "counters": {
                "rx_frames": 5, "rx_bytes": 500, "tx_frames": 3, "tx_bytes": 300,
                "drops": { "acl_deny": 2 }, "tx_drops": {} } }],
            "tunnel": { "rx_packets": 1, "tx_packets": 2, "drops": { "unknown_vni": 4 } },
            "mac_entries": 7,
            "netflow": [{ "name": "m", "open_flows": 3, "export": { "records": 9, "send_errors": 1 }, "flows": { "evicted": 0 } }],
        });
        let stats: Stats = serde_json::from_value(stats).unwrap();
        let text = agent(&stats, Some(12));
        // Two hosts: each family is declared once.
        let two = agents(&[(&stats, None), (&stats, None)]);
        assert_eq!(
            two.matches("# TYPE dvs_port_drops_total counter").count(),
            1
        );
        for want in [
            "dvs_agent_revision{host=\"h1\"} 12",
            "dvs_port_rx_frames_total{host=\"h1\",port=\"veth1\",name=\"web\\\"1\"} 5",
            "dvs_port_drops_total{host=\"h1\",port=\"veth1\",reason=\"acl_deny\"} 2",
            "dvs_tunnel_drops_total{host=\"h1\",reason=\"unknown_vni\"} 4",
            "dvs_netflow_records_total{host=\"h1\",monitor=\"m\"} 9",
            "# TYPE dvs_port_drops_total counter",
        ] {
            assert!(text.contains(want), "{want} missing in\n{text}");
        }
    }

    #[test]
    fn the_endpoint_answers_a_get() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        serve(addr, || "dvs_up 1\n".to_string()).unwrap();
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        assert!(r.starts_with("HTTP/1.1 200 OK"), "{r}");
        assert!(r.ends_with("dvs_up 1\n"), "{r}");
    }
}
