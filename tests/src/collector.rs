//! Real flow collectors for the end-to-end suite: `nfcapd` (nfdump) stores
//! what dvs exports, `nfdump` reads it back, and a `tshark` capture of the
//! export packets checks that Wireshark decodes each without a malformed
//! mark. Both run inside a namespace of a [`Topo`], which stops them.

use std::path::PathBuf;
use std::time::Duration;

use crate::netns::{wait_for, Topo};

/// One flow record as nfdump prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NfRecord {
    pub proto: u8,
    pub src: String,
    pub src_port: u16,
    pub dst: String,
    pub dst_port: u16,
    pub packets: u64,
    pub bytes: u64,
    pub input: u32,
    pub output: u32,
    pub vlan: u16,
}

/// An `nfcapd` listening in a namespace.
#[derive(Debug)]
pub struct Nfcapd {
    label: String,
    pub dir: PathBuf,
    pub port: u16,
}

impl Nfcapd {
    /// Start nfcapd in `ns` on `ip:port`, storing under the topology's dir.
    pub fn start(topo: &mut Topo, ns: &str, ip: &str, port: u16) -> Self {
        let dir = topo.dir.join(format!("nfcapd-{port}"));
        std::fs::create_dir_all(&dir).expect("nfcapd dir");
        let label = format!("nfcapd-{port}");
        let (d, p) = (dir.to_string_lossy().into_owned(), port.to_string());
        topo.spawn(
            ns,
            &label,
            &["nfcapd", "-w", &d, "-b", ip, "-p", &p, "-t", "3600"],
        );
        let up = wait_for(Duration::from_secs(10), || {
            topo.sh(ns, "ss -Hlun").contains(&format!(":{port}"))
        });
        assert!(up, "nfcapd never listened:\n{}", topo.log(&label));
        Nfcapd { label, dir, port }
    }

    /// Stop nfcapd (it closes its file at once on SIGTERM) and read every
    /// record it stored; also returns nfdump's summary (`-I`) and exporter
    /// listing (`-E`), both of which count sequence failures.
    pub fn finish(self, topo: &mut Topo) -> (Vec<NfRecord>, String) {
        let st = topo.stop(&self.label);
        assert!(
            st.is_some(),
            "nfcapd did not stop on SIGTERM:\n{}",
            topo.log(&self.label)
        );
        let d = self.dir.to_string_lossy();
        let out = topo.sh(
            "",
            &format!("nfdump -R {d} -q -N -o 'fmt:%pr|%sa|%sp|%da|%dp|%pkt|%byt|%in|%out|%svln'"),
        );
        let records = out.lines().filter_map(parse_line).collect();
        let exporters = topo.sh(
            "",
            &format!("nfdump -R {d} -I 2>&1; for f in {d}/nfcapd.*; do nfdump -E $f 2>&1; done"),
        );
        (records, exporters)
    }
}

/// The sequence failures nfdump's `-I` summary and `-E` listing report,
/// summed (`None` when it prints no such line).
pub fn sequence_failures(exporters: &str) -> Option<u64> {
    let mut found = None;
    for line in exporters.lines() {
        let l = line.to_ascii_lowercase();
        if let Some(i) = l.find("sequence failures") {
            let n: String = l[i..]
                .chars()
                .skip_while(|c| !c.is_ascii_digit())
                .take_while(char::is_ascii_digit)
                .collect();
            *found.get_or_insert(0) += n.parse::<u64>().unwrap_or(0);
        }
    }
    found
}

fn parse_line(line: &str) -> Option<NfRecord> {
    let f: Vec<&str> = line.split('|').map(str::trim).collect();
    if f.len() < 10 {
        return None;
    }
    let proto = match f[0] {
        "ICMP" => 1,
        "TCP" => 6,
        "UDP" => 17,
        "ICMP6" => 58,
        p => p.parse().ok()?,
    };
    Some(NfRecord {
        proto,
        src: f[1].to_string(),
        src_port: parse_port(f[2])?,
        dst: f[3].to_string(),
        dst_port: parse_port(f[4])?,
        packets: f[5].parse().ok()?,
        bytes: f[6].parse().ok()?,
        input: f[7].parse().ok()?,
        output: f[8].parse().ok()?,
        vlan: f[9].parse().ok()?,
    })
}

/// nfdump prints ICMP's type·256+code as `type.code` in the port column.
fn parse_port(s: &str) -> Option<u16> {
    match s.split_once('.') {
        Some((t, c)) => Some(t.parse::<u16>().ok()? << 8 | c.parse::<u16>().ok()?),
        None => s.parse().ok(),
    }
}

/// A packet capture (tshark) of the exports sent to a collector port.
#[derive(Debug)]
pub struct Capture {
    label: String,
    file: PathBuf,
    port: u16,
}

/// What tshark made of a capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// Packets in the capture.
    pub packets: usize,
    /// Packets with a NetFlow/IPFIX (cflow) layer.
    pub cflow: usize,
    /// Packets tshark marked malformed.
    pub malformed: usize,
    /// Expert-info lines of error or warning severity.
    pub problems: Vec<String>,
}

/// The UDP port of the probes that show a capture has started.
const PROBE_PORT: u16 = 9;

impl Capture {
    /// Capture UDP to `port` on `iface` in `ns`; returns once a probe sent
    /// from `ns` to `probe_to` (an address reached through `iface`) shows in
    /// the capture — "Capturing on" is printed before packets are.
    pub fn start(topo: &mut Topo, ns: &str, iface: &str, port: u16, probe_to: &str) -> Self {
        let file = topo.dir.join(format!("exports-{port}.pcap"));
        let label = format!("tshark-{port}");
        let f = file.to_string_lossy().into_owned();
        topo.spawn(
            ns,
            &label,
            &[
                "tshark",
                "-q",
                "-i",
                iface,
                "-f",
                &format!("udp dst port {port} or udp dst port {PROBE_PORT}"),
                "-w",
                &f,
            ],
        );
        let up = wait_for(Duration::from_secs(20), || {
            topo.log(&label).contains("Capturing on")
        });
        assert!(up, "tshark never started:\n{}", topo.log(&label));
        let probe = format!(
            "/usr/bin/python3 -c 'import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b\"probe\", (\"{probe_to}\", {PROBE_PORT}))'"
        );
        let live = wait_for(Duration::from_secs(20), || {
            topo.sh(ns, &probe);
            std::thread::sleep(Duration::from_millis(200));
            let seen = topo.try_sh(
                "",
                &format!("tshark -r {f} -Y udp.dstport=={PROBE_PORT} 2>/dev/null | wc -l"),
            );
            String::from_utf8_lossy(&seen.stdout).trim() != "0"
        });
        assert!(live, "tshark captured no probe:\n{}", topo.log(&label));
        Capture { label, file, port }
    }

    /// Stop capturing and decode every packet as NetFlow/IPFIX.
    pub fn finish(self, topo: &mut Topo) -> Decoded {
        // dumpcap flushes on SIGTERM; give the last packets a moment.
        std::thread::sleep(Duration::from_millis(500));
        topo.stop(&self.label);
        let f = self.file.to_string_lossy();
        let p = self.port;
        let fields = topo.sh(
            "",
            &format!(
                "tshark -r {f} -d udp.port=={p},cflow -Y udp.dstport=={p} -T fields -e frame.number -e cflow.version -e _ws.malformed"
            ),
        );
        let lines: Vec<&str> = fields.lines().filter(|l| !l.trim().is_empty()).collect();
        let cflow = lines
            .iter()
            .filter(|l| l.split('\t').nth(1).is_some_and(|v| !v.is_empty()))
            .count();
        let malformed = lines
            .iter()
            .filter(|l| l.split('\t').nth(2).is_some_and(|v| !v.is_empty()))
            .count();
        let expert = topo.sh(
            "",
            &format!("tshark -r {f} -d udp.port=={p},cflow -q -z expert,warn,udp.dstport=={p}"),
        );
        let problems = expert
            .lines()
            .filter(|l| {
                let l = l.to_ascii_lowercase();
                (l.contains("error") || l.contains("warn")) && !l.contains("expert information")
            })
            .map(str::to_string)
            .collect();
        Decoded {
            packets: lines.len(),
            cflow,
            malformed,
            problems,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nfdump_lines_parse() {
        let r = parse_line("ICMP|10.10.0.1|0|10.10.0.2|8.0|7|896|1|0|10").unwrap();
        assert_eq!(
            (r.proto, r.dst_port, r.packets, r.bytes),
            (1, 8 << 8, 7, 896)
        );
        assert_eq!((r.input, r.output, r.vlan), (1, 0, 10));
        assert!(parse_line("Summary: total flows: 4").is_none());
        assert_eq!(
            sequence_failures("Id:   1, IP: 10.99.0.1, version: 9, ID: 1, Sequence failures: 0, packets: 3\nId: 2 ... Sequence failures: 2,"),
            Some(2)
        );
    }
}
