//! The in-process lab: an embedded controller and N hosts under it, each
//! the agent core of `dvs agent` (`AgentCore`) over a real `Datapath` with
//! in-memory ports and a tunnel endpoint (127.0.0.10+i) on an in-memory
//! underlay; two VMs per host — smoltcp TCP/IP stacks — one on VLAN 10 and
//! one on VLAN 20, all in one IP subnet so that any VLAN leak would show.
//!
//! The controller is `dvs controller`'s own services called in process
//! (`control`): the lab's port profiles and VM ports go in through the
//! admin API, as `dvs` sends them; each host registers over the agent API,
//! takes its state (full, then the deltas the other hosts' arrival
//! caused), checks it as an agent file and runs it, acknowledges it,
//! carries out migration commands and reports its counters.
//!
//! Everything runs on one thread and one virtual clock (`fabric`): a run
//! is a function of its options — the seed picks the VMs' TCP sequence
//! numbers and which datagrams the underlay loses — and two runs with one
//! seed report the same, apart from the wall-clock time they began.
//!
//! A run: every VM pings every other VM (replies expected only within a
//! VLAN), then a TCP transfer between two hosts' VLAN 10 VMs, then live
//! migrations under traffic; the report holds the controller's chassis
//! view, the reachability matrix, the transfer, the migrations' timelines,
//! and every host's ports, counters and MAC table.

use std::fmt::Write as _;

use dvs_proto::stats::PortStats;
use dvs_proto::MacAddr;
use dvs_switch::TunnelCounters;
use serde::Serialize;

mod control;
pub mod fabric;
pub mod netns;
mod vm;
mod world;

use fabric::FabricCounters;
use world::Lab;

/// What to run.
#[derive(Debug, Clone)]
pub struct LabOptions {
    pub hosts: usize,
    /// Bytes moved by the TCP transfer.
    pub tcp_bytes: usize,
    /// Echo requests from each VM to each other VM.
    pub pings: u16,
    /// Seed of the run: the VMs' stacks (TCP initial sequence numbers,
    /// ports) and the underlay's losses.
    pub seed: u64,
    /// Datagrams per million the underlay loses.
    pub loss_ppm: u32,
    /// Live migrations of vm1 (to the last host and back, alternately).
    pub migrations: usize,
}

impl Default for LabOptions {
    fn default() -> Self {
        Self {
            hosts: 2,
            tcp_bytes: 4 << 20,
            pings: 3,
            seed: 0x5eed,
            loss_ppm: 0,
            migrations: 2,
        }
    }
}

/// Errors that stop the lab before it reports.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("configuring the switch of host {0}")]
    Switch(String, #[source] dvs_switch::Error),
    #[error("the lab needs 2 to 8 hosts, not {0}")]
    Hosts(usize),
    #[error("the lab's controller: {0}")]
    Controller(String),
    #[error("the namespace lab: {0}")]
    Netns(String),
}

/// The lab's findings.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Real parts (`dvs lab --netns`): processes, namespaces, the real
    /// clock.
    pub netns: bool,
    pub seed: u64,
    pub loss_ppm: u32,
    /// What the in-memory underlay carried and lost.
    pub fabric: FabricCounters,
    /// Virtual time the run took.
    pub virtual_ms: u64,
    /// The embedded controller's view (`dvs show chassis --output json`).
    pub chassis: serde_json::Value,
    /// The same as `dvs show chassis` prints it.
    #[serde(skip)]
    pub chassis_table: String,
    pub hosts: Vec<HostReport>,
    pub pings: Vec<PingResult>,
    pub tcp: TcpResult,
    pub migrations: Vec<MigrationResult>,
    /// `dvs migrate list` as it prints.
    #[serde(skip)]
    pub migrations_table: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    pub name: String,
    pub tunnel: String,
    pub ports: Vec<PortStats>,
    pub uplink: TunnelCounters,
    pub macs: Vec<MacLine>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MacLine {
    pub vlan: u16,
    pub mac: String,
    pub at: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct PingResult {
    pub from: String,
    pub to: String,
    pub same_vlan: bool,
    pub sent: u16,
    pub received: u16,
    /// Replies expected (same VLAN) and none missing, or none expected and
    /// none received.
    pub ok: bool,
}

/// A live migration under traffic, as the lab saw it.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationResult {
    pub vm: String,
    pub from: String,
    pub to: String,
    /// How long the VM was paused (its stop-and-copy).
    pub pause_ms: f64,
    /// Pings every 10 ms to a peer for the whole migration.
    pub pings_sent: u32,
    pub pings_lost: u32,
    /// The TCP stream to the peer that ran across it.
    pub tcp_bytes: usize,
    pub tcp_intact: bool,
    /// The controller's record: phase and timeline (`dvs migrate list`).
    pub record: serde_json::Value,
    /// Done, the stream intact, and no more pings lost than the pause's.
    pub ok: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct TcpResult {
    pub from: String,
    pub to: String,
    pub bytes_sent: usize,
    pub bytes_received: usize,
    /// The received bytes match the pattern sent.
    pub intact: bool,
    pub millis: u64,
    pub ok: bool,
}

impl Report {
    /// Every check passed.
    pub fn ok(&self) -> bool {
        self.tcp.ok && self.pings.iter().all(|p| p.ok) && self.migrations.iter().all(|m| m.ok)
    }

    /// The report as text tables.
    pub fn render(&self) -> String {
        let mut s = String::new();
        self.render_header(&mut s);
        let _ = writeln!(s, "{}", self.chassis_table);
        for h in &self.hosts {
            render_host(&mut s, h);
        }
        self.render_traffic(&mut s);
        self.render_migrations(&mut s);
        let _ = writeln!(
            s,
            "\nresult: {}",
            if self.ok() {
                "all checks passed"
            } else {
                "FAILED"
            }
        );
        s
    }

    fn render_header(&self, s: &mut String) {
        if self.netns {
            let _ = writeln!(
                s,
                "dvs lab --netns — `dvs controller` and {} `dvs agent` processes joined by VXLAN on loopback,\n\
                 VMs as network namespaces on the agents' TAPs (the kernel's TCP/IP), on the real clock\n",
                self.hosts.len()
            );
        } else {
            let _ = writeln!(
                s,
                "dvs lab — an embedded controller and {} hosts joined by VXLAN on an in-memory underlay\n\
                 (virtual clock: {} ms; seed {:#x}; underlay loss {} ppm: {} of {} datagrams lost)\n",
                self.hosts.len(),
                self.virtual_ms,
                self.seed,
                self.loss_ppm,
                self.fabric.lost,
                self.fabric.sent,
            );
        }
    }

    /// The reachability matrix and the TCP transfer.
    fn render_traffic(&self, s: &mut String) {
        let _ = writeln!(
            s,
            "reachability (ping, {} requests each):",
            self.pings.first().map_or(0, |p| p.sent)
        );
        for p in &self.pings {
            let _ = writeln!(
                s,
                "  {:<8} -> {:<8} {:<14} {}/{} replies  {}",
                p.from,
                p.to,
                if p.same_vlan {
                    "same VLAN"
                } else {
                    "other VLAN"
                },
                p.received,
                p.sent,
                if p.ok { "ok" } else { "FAIL" }
            );
        }
        let t = &self.tcp;
        if self.netns && t.bytes_sent == 0 && t.ok {
            let _ = writeln!(
                s,
                "\nTCP {} -> {}: not run (python3 sends and checks it: not installed)",
                t.from, t.to
            );
            return;
        }
        let _ = writeln!(
            s,
            "\nTCP {} -> {}: {} of {} bytes in {} ms, {} — {}",
            t.from,
            t.to,
            t.bytes_received,
            t.bytes_sent,
            t.millis,
            if t.intact { "intact" } else { "CORRUPT" },
            if t.ok { "ok" } else { "FAIL" }
        );
    }

    fn render_migrations(&self, s: &mut String) {
        if self.migrations.is_empty() {
            return;
        }
        let _ = writeln!(
            s,
            "\nlive migrations, each under {}a ping every 10 ms (dvs migrate list):\n{}",
            if self.netns { "" } else { "a TCP stream and " },
            self.migrations_table
        );
        for m in &self.migrations {
            let r = &m.record;
            let ms = |k: &str| {
                r[k].as_f64()
                    .map_or_else(|| "-".to_string(), |v| format!("{v:.1} ms"))
            };
            let tcp = if self.netns {
                String::new()
            } else {
                format!(
                    "; TCP {} B {}",
                    m.tcp_bytes,
                    if m.tcp_intact { "intact" } else { "CORRUPT" }
                )
            };
            let _ = writeln!(
                s,
                "  {} {} -> {}: policy ready {}, switchover {} ({}), last frame at source {}, first at destination {}, blackout {}; VM paused {:.1} ms; pings {}/{} lost{tcp} — {}",
                m.vm,
                m.from,
                m.to,
                ms("policy_ready_ms"),
                ms("switchover_ms"),
                r["trigger"].as_str().unwrap_or("-"),
                ms("last_frame_at_source_ms"),
                ms("first_frame_at_destination_ms"),
                ms("blackout_ms"),
                m.pause_ms,
                m.pings_lost,
                m.pings_sent,
                if m.ok { "ok" } else { "FAIL" }
            );
        }
    }
}

/// A host's ports, tunnel counters and MAC table.
fn render_host(s: &mut String, h: &HostReport) {
    let _ = writeln!(s, "module {} (tunnel {})", h.name, h.tunnel);
    let _ = writeln!(
        s,
        "  {:<8} {:<8} {:<10} {:>9} {:>9} {:>9} {:>9}  drops",
        "port", "name", "vlan", "rx_frames", "rx_bytes", "tx_frames", "tx_bytes"
    );
    for p in &h.ports {
        let c = &p.counters;
        let drops: Vec<String> = c.drops.nonzero().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(
            s,
            "  {:<8} {:<8} {:<10} {:>9} {:>9} {:>9} {:>9}  {}",
            p.id,
            p.name,
            p.vlan,
            c.rx_frames,
            c.rx_bytes,
            c.tx_frames,
            c.tx_bytes,
            if drops.is_empty() {
                "-".into()
            } else {
                drops.join(",")
            }
        );
    }
    let u = &h.uplink;
    let _ = writeln!(
        s,
        "  vxlan    rx {} pkts / {} B, tx {} pkts / {} B, drops {}",
        u.rx_packets,
        u.rx_bytes,
        u.tx_packets,
        u.tx_bytes,
        u.drops.total()
    );
    if h.macs.is_empty() {
        let _ = writeln!(
            s,
            "  MAC table: not listed (an agent's stats file counts its entries)\n"
        );
        return;
    }
    let _ = writeln!(s, "  MAC table:");
    for m in &h.macs {
        let _ = writeln!(s, "    vlan {:<5} {}  {}", m.vlan, m.mac, m.at);
    }
    let _ = writeln!(s);
}

/// Run the lab and report.
///
/// # Errors
/// [`LabError`] when the fabric cannot be set up (a socket cannot be bound).
pub fn run(opts: LabOptions) -> Result<Report, LabError> {
    if !(2..=8).contains(&opts.hosts) {
        return Err(LabError::Hosts(opts.hosts));
    }
    let mut lab = Lab::build(&opts)?;
    let pings = lab.ping_all(opts.pings);
    let tcp = lab.tcp_transfer(0, 2, opts.tcp_bytes);
    // vm1 (h1, VLAN 10) moves to the last host and back, streaming to
    // VLAN 10's VM on h2.
    let mut migrations = Vec::new();
    let last = opts.hosts - 1;
    for k in 0..opts.migrations {
        let to = if k % 2 == 0 { last } else { 0 };
        migrations.push(lab.migrate(0, to, 2, 256 * 1024)?);
    }
    let (chassis, chassis_table) = lab.chassis_view()?;
    let migrations_table = lab.control.view(
        dvs_controller::client::Command::MigrateList,
        dvs_controller::client::Output::Table,
    )?;
    Ok(Report {
        netns: false,
        seed: opts.seed,
        loss_ppm: opts.loss_ppm,
        fabric: lab.fabric.counters(),
        virtual_ms: lab.now().as_millis() as u64,
        chassis,
        chassis_table,
        hosts: lab.host_reports(),
        pings,
        tcp,
        migrations,
        migrations_table,
    })
}

/// The VMs' MACs, for tests.
pub fn vm_mac(host: usize, index: usize) -> MacAddr {
    MacAddr([2, 0xd5, 0, 0, host as u8 + 1, index as u8 + 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_hosts_ping_within_vlans_only_and_move_tcp() {
        let r = run(LabOptions {
            tcp_bytes: 1 << 20,
            ..LabOptions::default()
        })
        .unwrap();
        let text = r.render();
        assert!(r.ok(), "{text}");
        // Each host's VLAN 10 VM reached the other host's through VXLAN.
        assert!(r
            .hosts
            .iter()
            .all(|h| h.uplink.rx_packets > 0 && h.uplink.tx_packets > 0));
        // Nothing crossed VLANs: the VLAN 20 VMs never heard the VLAN 10 VMs' pings.
        for p in r.pings.iter().filter(|p| !p.same_vlan) {
            assert_eq!(p.received, 0, "{text}");
        }
        // The controller saw both hosts converge and every port up.
        let mods = r.chassis["modules"].as_array().unwrap();
        assert_eq!(mods.len(), 2, "{text}");
        assert!(
            mods.iter()
                .all(|m| m["connected"] == true && m["acked_revision"] == m["desired_revision"]),
            "{text}"
        );
        let ports = r.chassis["interfaces"].as_array().unwrap();
        assert_eq!(ports.len(), 4);
        assert!(ports.iter().all(|p| p["state"] == "up"), "{text}");
        assert!(text.contains("veth1"), "{text}");
        // Every host knows all four VMs, two of them behind the tunnel.
        for h in &r.hosts {
            assert_eq!(h.macs.len(), 4, "{text}");
            assert_eq!(
                h.macs.iter().filter(|m| m.at.starts_with("remote")).count(),
                2
            );
        }
        assert_eq!(vm_mac(0, 0).to_string(), "02:d5:00:00:01:01");
        // vm1 went to h2 and back under traffic; the stream arrived whole,
        // and the port, with its counters, is on h1 again.
        assert_eq!(r.migrations.len(), 2, "{text}");
        for m in &r.migrations {
            assert_eq!(m.record["phase"], "done", "{text}");
            assert_eq!(m.record["trigger"], "first_frame", "{text}");
            assert!(m.tcp_intact && m.tcp_bytes > 0, "{text}");
        }
        assert_eq!(r.chassis["interfaces"][0]["host"], "h1", "{text}");
        let vm1 = &r.hosts[0]
            .ports
            .iter()
            .find(|p| p.id == "veth1")
            .unwrap()
            .counters;
        assert!(vm1.rx_frames > 1000, "counters carried over: {text}");
        assert!(text.contains("live migrations"), "{text}");
    }

    /// The report as JSON, without the wall-clock time each migration
    /// began (the only field that depends on when the run was made).
    fn timeless(r: &Report) -> serde_json::Value {
        let mut v = serde_json::to_value(r).unwrap();
        for m in v["migrations"].as_array_mut().unwrap() {
            m["record"]["begin_unix_us"] = serde_json::Value::Null;
        }
        v
    }

    #[test]
    fn a_seed_makes_the_same_run_losses_included() {
        let opts = LabOptions {
            tcp_bytes: 256 * 1024,
            pings: 2,
            seed: 42,
            loss_ppm: 20_000,
            migrations: 1,
            ..LabOptions::default()
        };
        let one = run(opts.clone()).unwrap();
        let two = run(opts.clone()).unwrap();
        assert!(one.fabric.lost > 0, "{}", one.render());
        assert_eq!(
            one.migrations[0].record["phase"],
            "done",
            "{}",
            one.render()
        );
        assert_eq!(one.migrations_table, two.migrations_table);
        assert_eq!(one.chassis_table, two.chassis_table);
        assert_eq!(timeless(&one), timeless(&two));
        // Another seed loses other datagrams.
        let other = run(LabOptions { seed: 43, ..opts }).unwrap();
        assert_ne!(one.fabric, other.fabric);
    }

    #[test]
    fn three_hosts_flood_by_head_end_replication() {
        let r = run(LabOptions {
            hosts: 3,
            tcp_bytes: 64 * 1024,
            pings: 2,
            ..LabOptions::default()
        })
        .unwrap();
        assert!(r.ok(), "{}", r.render());
        assert_eq!(r.pings.len(), 6 * 5);
    }
}
