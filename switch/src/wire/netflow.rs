//! NetFlow v5, v9 (RFC 3954) and IPFIX (RFC 7011) export messages.
//!
//! One [`Encoder`] per monitor and exporter writes messages of at most
//! [`MAX_MESSAGE`] bytes. What collectors need, and what each version does:
//!
//! - **interfaces** are the port's chassis-wide number (ingress for what a VM
//!   sent, egress for what it received), so a port keeps its interface when
//!   its VM moves; v5 has 16 bits for them (higher ports export as 0);
//! - **VLAN** in IE 58 (v9, IPFIX; v5 has no field for it), **direction**
//!   in IE 61 (0: into the switch from the VM, 1: out of it to the VM);
//! - **octets** are L3 (IP total length); ICMP's type·256+code is in the
//!   destination port;
//! - **times**: v5 and v9 send sysUpTime-relative first/last (IE 22/21);
//!   IPFIX sends flowStart/EndMilliseconds (IE 152/153) — nfdump 1.7 misreads
//!   IPFIX's sysUpTime forms;
//! - **sequence**: v5 counts flows sent before the message, v9 export
//!   packets, IPFIX flow data records — each per source ID / observation
//!   domain. RFC 7011 counts options data records too, and so does
//!   Wireshark's sequence analysis, but nfdump (1.7) counts only data
//!   records of data templates, as softflowd and pmacct's nfprobe export
//!   them: an options record in every template refresh made nfdump report
//!   a sequence failure each time. So IPFIX carries the options record
//!   (sampling) only when the monitor samples, and the sequence counts flow
//!   records: nfdump and Wireshark then agree on every unsampled export
//!   (a sampled one shows a Wireshark warning per options record);
//! - **v9 header count** is every record in the packet, template and option
//!   records included (softflowd counts data records only and tshark stops
//!   reading its packets early);
//! - **templates** (v9, IPFIX): IPv4 (256), IPv6 (257), and an options
//!   template (258) whose record carries the sampling interval and
//!   algorithm and the exporter's identity (address, source ID). The caller
//!   says when to (re)send them.

use std::net::IpAddr;

use dvs_proto::FlowVersion;

use crate::flow::{Direction, FlowRecord};

/// The largest message written: fits a 1500-byte underlay with room for
/// IPv6 and tunnel headers.
pub const MAX_MESSAGE: usize = 1400;
pub const TEMPLATE_V4: u16 = 256;
pub const TEMPLATE_V6: u16 = 257;
pub const TEMPLATE_OPTIONS: u16 = 258;
/// NetFlow v5 carries at most 30 records per packet.
const V5_MAX_RECORDS: usize = 30;
const V5_HEADER: usize = 24;
const V5_RECORD: usize = 48;

/// Data fields after the addresses, shared by both templates:
/// (IE, length, v9 length when different).
const V9_TAIL: &[(u16, u16)] = &[
    (4, 1),  // protocolIdentifier
    (7, 2),  // sourceTransportPort
    (11, 2), // destinationTransportPort
    (5, 1),  // ipClassOfService
    (6, 1),  // tcpControlBits
    (10, 4), // ingressInterface
    (14, 4), // egressInterface
    (58, 2), // vlanId
    (61, 1), // flowDirection
    (2, 8),  // packetDeltaCount
    (1, 8),  // octetDeltaCount
    (22, 4), // FIRST_SWITCHED (sysUpTime ms)
    (21, 4), // LAST_SWITCHED
];

const IPFIX_TAIL: &[(u16, u16)] = &[
    (4, 1),
    (7, 2),
    (11, 2),
    (5, 1),
    (6, 1),
    (10, 4),
    (14, 4),
    (58, 2),
    (61, 1),
    (2, 8),
    (1, 8),
    (152, 8), // flowStartMilliseconds
    (153, 8), // flowEndMilliseconds
    (136, 1), // flowEndReason
];

/// The clock of one message: the datapath's (flow times are on it) and the
/// wall clock, read together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportClock {
    /// The datapath clock now, ms (NetFlow's sysUpTime).
    pub uptime_ms: u64,
    /// UNIX time now, ms.
    pub unix_ms: u64,
}

impl ExportClock {
    fn unix_of(self, uptime_ms: u64) -> u64 {
        (self.unix_ms + uptime_ms).saturating_sub(self.uptime_ms)
    }
}

/// What an [`Encoder::encode`] call wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Encoded {
    /// Records taken from the input (written or skipped).
    pub consumed: usize,
    /// Data records written.
    pub records: usize,
    /// Records the version cannot carry (IPv6 in v5), skipped.
    pub skipped: usize,
}

/// Builds one exporter's messages for one monitor.
#[derive(Debug, Clone)]
pub struct Encoder {
    version: FlowVersion,
    /// v9 source ID, IPFIX observation domain, v5 engine ID (low byte).
    domain: u32,
    sampling: u32,
    exporter: IpAddr,
    /// The next message's sequence number.
    sequence: u32,
}

impl Encoder {
    /// An encoder for `version` with source ID / observation domain
    /// `domain`, exporting from address `exporter` with 1-in-`sampling`
    /// packet sampling.
    pub fn new(version: FlowVersion, domain: u32, exporter: IpAddr, sampling: u32) -> Self {
        Encoder {
            version,
            domain,
            sampling: sampling.max(1),
            exporter,
            sequence: 0,
        }
    }

    /// Does this version use templates?
    pub fn has_templates(&self) -> bool {
        self.version != FlowVersion::V5
    }

    /// Write one message into `out` (cleared first) with as many of
    /// `records` as fit, preceded by the templates and the options record
    /// when `templates` is set (ignored by v5).
    pub fn encode(
        &mut self,
        clock: ExportClock,
        templates: bool,
        records: &[FlowRecord],
        out: &mut Vec<u8>,
    ) -> Encoded {
        out.clear();
        match self.version {
            FlowVersion::V5 => self.encode_v5(clock, records, out),
            FlowVersion::V9 | FlowVersion::Ipfix => {
                self.encode_templated(clock, templates, records, out)
            }
        }
    }

    fn encode_v5(
        &mut self,
        clock: ExportClock,
        records: &[FlowRecord],
        out: &mut Vec<u8>,
    ) -> Encoded {
        let max = V5_MAX_RECORDS.min((MAX_MESSAGE - V5_HEADER) / V5_RECORD);
        out.resize(V5_HEADER, 0);
        let mut e = Encoded::default();
        for r in records {
            if e.records == max {
                break;
            }
            e.consumed += 1;
            let (IpAddr::V4(src), IpAddr::V4(dst)) = (r.id.src, r.id.dst) else {
                e.skipped += 1;
                continue;
            };
            let port16 = u16::try_from(r.id.port).unwrap_or(0);
            let (input, output) = match r.id.dir {
                Direction::FromVm => (port16, 0),
                Direction::ToVm => (0, port16),
            };
            out.extend_from_slice(&src.octets());
            out.extend_from_slice(&dst.octets());
            out.extend_from_slice(&[0; 4]); // nexthop
            out.extend_from_slice(&input.to_be_bytes());
            out.extend_from_slice(&output.to_be_bytes());
            out.extend_from_slice(&sat32(r.packets).to_be_bytes());
            out.extend_from_slice(&sat32(r.octets).to_be_bytes());
            out.extend_from_slice(&(r.first.as_millis() as u32).to_be_bytes());
            out.extend_from_slice(&(r.last.as_millis() as u32).to_be_bytes());
            out.extend_from_slice(&r.id.src_port.to_be_bytes());
            out.extend_from_slice(&r.id.dst_port.to_be_bytes());
            out.push(0); // pad1
            out.push(r.tcp_flags);
            out.push(r.id.proto);
            out.push(r.id.tos);
            out.extend_from_slice(&[0; 8]); // AS numbers, masks, pad2
            e.records += 1;
        }
        let h = &mut out[..V5_HEADER];
        h[0..2].copy_from_slice(&5u16.to_be_bytes());
        h[2..4].copy_from_slice(&(e.records as u16).to_be_bytes());
        h[4..8].copy_from_slice(&(clock.uptime_ms as u32).to_be_bytes());
        h[8..12].copy_from_slice(&((clock.unix_ms / 1000) as u32).to_be_bytes());
        h[12..16].copy_from_slice(&(((clock.unix_ms % 1000) * 1_000_000) as u32).to_be_bytes());
        h[16..20].copy_from_slice(&self.sequence.to_be_bytes());
        h[20] = 0; // engine type
        h[21] = self.domain as u8; // engine ID
                                   // Sampling: mode 01 (deterministic 1 in N) in the top two bits.
        let sampling: u16 = if self.sampling > 1 {
            0x4000 | (self.sampling as u16 & 0x3fff)
        } else {
            0
        };
        h[22..24].copy_from_slice(&sampling.to_be_bytes());
        self.sequence = self.sequence.wrapping_add(e.records as u32);
        e
    }

    fn encode_templated(
        &mut self,
        clock: ExportClock,
        templates: bool,
        records: &[FlowRecord],
        out: &mut Vec<u8>,
    ) -> Encoded {
        let v9 = self.version == FlowVersion::V9;
        let header = if v9 { 20 } else { 16 };
        out.resize(header, 0);
        // v9's count: every record, template and option records included.
        let mut count: u16 = 0;
        if templates {
            // IPFIX sends the options record only when it says something
            // (see the module doc on sequence numbers).
            let options = v9 || self.sampling > 1;
            count += self.write_templates(out, options);
        }
        let mut e = Encoded::default();
        let mut i = 0;
        while i < records.len() {
            let v6 = records[i].id.src.is_ipv6();
            let len = record_len(v9, v6);
            if out.len() + 4 + len + 3 > MAX_MESSAGE {
                break;
            }
            let start = out.len();
            put16(out, if v6 { TEMPLATE_V6 } else { TEMPLATE_V4 });
            put16(out, 0);
            while let Some(r) = records.get(i) {
                if r.id.src.is_ipv6() != v6 || out.len() + len + 3 > MAX_MESSAGE {
                    break;
                }
                self.write_record(out, r, clock);
                e.records += 1;
                e.consumed += 1;
                count += 1;
                i += 1;
            }
            end_set(out, start, v9);
            if out.len() + 4 + record_len(v9, false) + 3 > MAX_MESSAGE {
                break;
            }
        }
        let len = out.len() as u16;
        let h = &mut out[..header];
        h[0..2].copy_from_slice(&self.version.number().to_be_bytes());
        if v9 {
            h[2..4].copy_from_slice(&count.to_be_bytes());
            h[4..8].copy_from_slice(&(clock.uptime_ms as u32).to_be_bytes());
            h[8..12].copy_from_slice(&((clock.unix_ms / 1000) as u32).to_be_bytes());
            h[12..16].copy_from_slice(&self.sequence.to_be_bytes());
            h[16..20].copy_from_slice(&self.domain.to_be_bytes());
            self.sequence = self.sequence.wrapping_add(1);
        } else {
            h[2..4].copy_from_slice(&len.to_be_bytes());
            h[4..8].copy_from_slice(&((clock.unix_ms / 1000) as u32).to_be_bytes());
            h[8..12].copy_from_slice(&self.sequence.to_be_bytes());
            h[12..16].copy_from_slice(&self.domain.to_be_bytes());
            // Flow records only, as nfdump counts (see the module doc).
            self.sequence = self.sequence.wrapping_add(e.records as u32);
        }
        e
    }

    /// The template set and, with `options`, the options template set and
    /// the options record; returns the records written (for v9's count).
    fn write_templates(&self, out: &mut Vec<u8>, options: bool) -> u16 {
        let v9 = self.version == FlowVersion::V9;
        let tail = if v9 { V9_TAIL } else { IPFIX_TAIL };
        let start = out.len();
        put16(out, if v9 { 0 } else { 2 });
        put16(out, 0);
        // Addresses, then ICMP type·256+code (nfdump reads v9 ICMP from it).
        for (id, addrs) in [
            (TEMPLATE_V4, [(8, 4), (12, 4), (32, 2)]),
            (TEMPLATE_V6, [(27, 16), (28, 16), (139, 2)]),
        ] {
            put16(out, id);
            put16(out, (addrs.len() + tail.len()) as u16);
            for (ie, len) in addrs.iter().chain(tail) {
                put16(out, *ie);
                put16(out, *len);
            }
        }
        end_set(out, start, v9);
        if !options {
            return 2;
        }
        // Options: scope = this exporter's source ID / observation domain.
        let addr_field = match self.exporter {
            IpAddr::V4(_) => (130, 4),
            IpAddr::V6(_) => (131, 16),
        };
        let fields: [(u16, u16); 5] = [addr_field, (34, 4), (35, 1), (305, 4), (306, 4)];
        let start = out.len();
        put16(out, if v9 { 1 } else { 3 });
        put16(out, 0);
        put16(out, TEMPLATE_OPTIONS);
        if v9 {
            put16(out, 4); // scope length: one field of 4 bytes
            put16(out, (fields.len() * 4) as u16);
            put16(out, 1); // scope System
            put16(out, 4);
        } else {
            put16(out, 1 + fields.len() as u16);
            put16(out, 1); // scope field count
            put16(out, 149); // observationDomainId
            put16(out, 4);
        }
        for (ie, len) in fields {
            put16(out, ie);
            put16(out, len);
        }
        end_set(out, start, v9);
        let start = out.len();
        put16(out, TEMPLATE_OPTIONS);
        put16(out, 0);
        out.extend_from_slice(&self.domain.to_be_bytes());
        match self.exporter {
            IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
            IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
        }
        out.extend_from_slice(&self.sampling.to_be_bytes());
        out.push(if self.sampling > 1 { 1 } else { 0 }); // 1: deterministic
        out.extend_from_slice(&1u32.to_be_bytes()); // packets selected in a row
        out.extend_from_slice(&(self.sampling - 1).to_be_bytes()); // then skipped
        end_set(out, start, v9);
        4 // two templates, the options template, its record
    }

    fn write_record(&self, out: &mut Vec<u8>, r: &FlowRecord, clock: ExportClock) {
        match (r.id.src, r.id.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                out.extend_from_slice(&s.octets());
                out.extend_from_slice(&d.octets());
            }
            (s, d) => {
                let v6 = |a: IpAddr| match a {
                    IpAddr::V6(a) => a.octets(),
                    IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
                };
                out.extend_from_slice(&v6(s));
                out.extend_from_slice(&v6(d));
            }
        }
        let icmp = if matches!(r.id.proto, 1 | 58) {
            r.id.dst_port
        } else {
            0
        };
        out.extend_from_slice(&icmp.to_be_bytes());
        out.push(r.id.proto);
        out.extend_from_slice(&r.id.src_port.to_be_bytes());
        out.extend_from_slice(&r.id.dst_port.to_be_bytes());
        out.push(r.id.tos);
        out.push(r.tcp_flags);
        let (ingress, egress, dir) = match r.id.dir {
            Direction::FromVm => (r.id.port, 0, 0u8),
            Direction::ToVm => (0, r.id.port, 1u8),
        };
        out.extend_from_slice(&ingress.to_be_bytes());
        out.extend_from_slice(&egress.to_be_bytes());
        out.extend_from_slice(&r.id.vlan.to_be_bytes());
        out.push(dir);
        out.extend_from_slice(&r.packets.to_be_bytes());
        out.extend_from_slice(&r.octets.to_be_bytes());
        let (first, last) = (r.first.as_millis() as u64, r.last.as_millis() as u64);
        if self.version == FlowVersion::V9 {
            out.extend_from_slice(&(first as u32).to_be_bytes());
            out.extend_from_slice(&(last as u32).to_be_bytes());
        } else {
            out.extend_from_slice(&clock.unix_of(first).to_be_bytes());
            out.extend_from_slice(&clock.unix_of(last).to_be_bytes());
            out.push(r.end.code());
        }
    }
}

fn record_len(v9: bool, v6: bool) -> usize {
    let tail = if v9 { V9_TAIL } else { IPFIX_TAIL };
    let addrs = if v6 { 32 + 2 } else { 8 + 2 };
    addrs + tail.iter().map(|(_, l)| usize::from(*l)).sum::<usize>()
}

fn sat32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

fn put16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// Close the set that starts at `start`: v9 pads it to 32 bits (RFC 3954
/// §5.3), then its length is written.
fn end_set(out: &mut Vec<u8>, start: usize, v9: bool) {
    if v9 {
        while !(out.len() - start).is_multiple_of(4) {
            out.push(0);
        }
    }
    let len = (out.len() - start) as u16;
    out[start + 2..start + 4].copy_from_slice(&len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{EndReason, FlowId};
    use netflow_parser::{NetflowPacket, NetflowParser};
    use std::time::Duration;

    const CLOCK: ExportClock = ExportClock {
        uptime_ms: 10_000,
        unix_ms: 1_700_000_010_250,
    };

    fn record(src: &str, dst: &str, dir: Direction) -> FlowRecord {
        FlowRecord {
            id: FlowId {
                port: 7,
                dir,
                vlan: 10,
                src: src.parse().unwrap(),
                dst: dst.parse().unwrap(),
                proto: 17,
                src_port: 5000,
                dst_port: 53,
                tos: 0x68,
            },
            packets: 3,
            octets: 300,
            first: Duration::from_millis(1500),
            last: Duration::from_millis(2500),
            tcp_flags: 0,
            end: EndReason::Idle,
        }
    }

    fn json(msg: &[u8]) -> (Vec<NetflowPacket>, String) {
        let parsed = NetflowParser::default().parse_bytes(msg);
        assert!(parsed.error.is_none(), "{:?}", parsed.error);
        let j = serde_json::to_value(&parsed.packets).unwrap().to_string();
        (parsed.packets, j)
    }

    /// Every data record (and options data record) of the decoded
    /// packets, as (field name, value) pairs in order.
    fn records(packets: &[NetflowPacket], key: &str) -> Vec<Vec<(String, String)>> {
        fn walk(v: &serde_json::Value, key: &str, out: &mut Vec<Vec<(String, String)>>) {
            match v {
                serde_json::Value::Object(m) => {
                    for (k, v) in m {
                        if k == key {
                            for rec in v["fields"].as_array().into_iter().flatten() {
                                let fields = rec.as_array().into_iter().flatten().map(|f| {
                                    let name = match &f[0] {
                                        serde_json::Value::String(s) => s.clone(),
                                        other => other["IANA"].as_str().unwrap_or("?").to_string(),
                                    };
                                    let value = f[1].to_string();
                                    (name, value)
                                });
                                out.push(fields.collect());
                            }
                        } else {
                            walk(v, key, out);
                        }
                    }
                }
                serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, key, out)),
                _ => {}
            }
        }
        let mut out = Vec::new();
        walk(&serde_json::to_value(packets).unwrap(), key, &mut out);
        out
    }

    fn expect(got: &[(String, String)], want: &[(&str, &str)]) {
        let got: Vec<(&str, &str)> = got.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_eq!(got, want);
    }

    const NO_FLAGS: &str = r#"{"TcpControlBits":{"ack":false,"cwr":false,"ece":false,"fin":false,"ns":false,"psh":false,"rst":false,"syn":false,"urg":false}}"#;

    fn has(json: &str, wants: &[&str]) {
        for want in wants {
            assert!(json.contains(want), "{want} missing in {json}");
        }
    }

    #[test]
    fn ipfix_fields_read_back_with_an_independent_decoder() {
        let mut enc = Encoder::new(FlowVersion::Ipfix, 42, "192.0.2.1".parse().unwrap(), 1);
        let mut msg = Vec::new();
        let recs = [
            record("10.0.0.1", "10.0.0.2", Direction::FromVm),
            record("2001:db8::1", "2001:db8::2", Direction::ToVm),
        ];
        let e = enc.encode(CLOCK, true, &recs, &mut msg);
        assert_eq!((e.consumed, e.records), (2, 2));
        assert_eq!(u16::from_be_bytes([msg[2], msg[3]]) as usize, msg.len());
        let (packets, j) = json(&msg);
        has(&j, &[r#""observation_domain_id":42"#]);
        let data = records(&packets, "Data");
        assert_eq!(data.len(), 2);
        // 1.5 s and 2.5 s of uptime: 8.5 s and 7.5 s before the export.
        let tail = |ingress: &'static str, egress: &'static str, dir: &'static str| {
            [
                ("ProtocolIdentifier", r#"{"ProtocolType":"Udp"}"#),
                ("SourceTransportPort", r#"{"DataNumber":{"U16":5000}}"#),
                ("DestinationTransportPort", r#"{"DataNumber":{"U16":53}}"#),
                ("IpClassOfService", r#"{"DataNumber":{"U8":104}}"#),
                ("TcpControlBits", NO_FLAGS),
                ("IngressInterface", ingress),
                ("EgressInterface", egress),
                ("VlanId", r#"{"DataNumber":{"U16":10}}"#),
                ("FlowDirection", dir),
                ("PacketDeltaCount", r#"{"DataNumber":{"U64":3}}"#),
                ("OctetDeltaCount", r#"{"DataNumber":{"U64":300}}"#),
                (
                    "FlowStartMilliseconds",
                    r#"{"Duration":{"nanos":750000000,"secs":1700000001}}"#,
                ),
                (
                    "FlowEndMilliseconds",
                    r#"{"Duration":{"nanos":750000000,"secs":1700000002}}"#,
                ),
                ("FlowEndReason", r#"{"FlowEndReason":"IdleTimeout"}"#),
            ]
        };
        let (n7, n0) = (r#"{"DataNumber":{"U32":7}}"#, r#"{"DataNumber":{"U32":0}}"#);
        let (d0, d1) = (r#"{"DataNumber":{"U8":0}}"#, r#"{"DataNumber":{"U8":1}}"#);
        let mut want = vec![
            ("SourceIpv4address", r#"{"Ip4Addr":"10.0.0.1"}"#),
            ("DestinationIpv4address", r#"{"Ip4Addr":"10.0.0.2"}"#),
            ("IcmpTypeCodeIpv4", r#"{"DataNumber":{"U16":0}}"#),
        ];
        want.extend(tail(n7, n0, d0));
        expect(&data[0], &want);
        let mut want = vec![
            ("SourceIpv6address", r#"{"Ip6Addr":"2001:db8::1"}"#),
            ("DestinationIpv6address", r#"{"Ip6Addr":"2001:db8::2"}"#),
            ("IcmpTypeCodeIpv6", r#"{"DataNumber":{"U16":0}}"#),
        ];
        want.extend(tail(n0, n7, d1));
        expect(&data[1], &want);
        // Unsampled: no options record; the sequence counts flow records.
        assert!(records(&packets, "OptionsData").is_empty());
        enc.encode(CLOCK, false, &recs[..1], &mut msg);
        assert_eq!(u32::from_be_bytes([msg[8], msg[9], msg[10], msg[11]]), 2);
        // Sampled: the options record says how, and is not counted.
        let mut enc = Encoder::new(FlowVersion::Ipfix, 42, "192.0.2.1".parse().unwrap(), 10);
        enc.encode(CLOCK, true, &recs, &mut msg);
        let (packets, _) = json(&msg);
        expect(
            &records(&packets, "OptionsData")[0],
            &[
                ("ObservationDomainId", r#"{"DataNumber":{"U32":42}}"#),
                ("ExporterIpv4address", r#"{"Ip4Addr":"192.0.2.1"}"#),
                ("SamplingInterval", r#"{"DataNumber":{"U32":10}}"#),
                ("SamplingAlgorithm", r#"{"DataNumber":{"U8":1}}"#),
                ("SamplingPacketInterval", r#"{"DataNumber":{"U32":1}}"#),
                ("SamplingPacketSpace", r#"{"DataNumber":{"U32":9}}"#),
            ],
        );
        enc.encode(CLOCK, false, &recs[..1], &mut msg);
        assert_eq!(u32::from_be_bytes([msg[8], msg[9], msg[10], msg[11]]), 2);
    }

    #[test]
    fn v9_counts_every_record_and_numbers_packets() {
        let mut enc = Encoder::new(FlowVersion::V9, 3, "192.0.2.1".parse().unwrap(), 10);
        let mut msg = Vec::new();
        let recs = [
            record("10.0.0.1", "10.0.0.2", Direction::FromVm),
            record("10.0.0.2", "10.0.0.1", Direction::ToVm),
        ];
        enc.encode(CLOCK, true, &recs, &mut msg);
        // 2 templates + options template + options record + 2 data records.
        assert_eq!(u16::from_be_bytes([msg[2], msg[3]]), 6);
        let (packets, j) = json(&msg);
        has(
            &j,
            &[r#""source_id":3"#, r#""sys_up_time":10000"#, r#""count":6"#],
        );
        let data = records(&packets, "Data");
        assert_eq!(data.len(), 2);
        expect(
            &data[1],
            &[
                ("Ipv4SrcAddr", r#"{"Ip4Addr":"10.0.0.2"}"#),
                ("Ipv4DstAddr", r#"{"Ip4Addr":"10.0.0.1"}"#),
                ("IcmpType", r#"{"DataNumber":{"U16":0}}"#),
                ("Protocol", r#"{"ProtocolType":"Udp"}"#),
                ("L4SrcPort", r#"{"DataNumber":{"U16":5000}}"#),
                ("L4DstPort", r#"{"DataNumber":{"U16":53}}"#),
                ("SrcTos", r#"{"DataNumber":{"U8":104}}"#),
                ("TcpFlags", NO_FLAGS),
                ("InputSnmp", r#"{"DataNumber":{"U32":0}}"#),
                ("OutputSnmp", r#"{"DataNumber":{"U32":7}}"#),
                ("SrcVlan", r#"{"DataNumber":{"U16":10}}"#),
                ("Direction", r#"{"DataNumber":{"U8":1}}"#),
                ("InPkts", r#"{"DataNumber":{"U64":3}}"#),
                ("InBytes", r#"{"DataNumber":{"U64":300}}"#),
                (
                    "FirstSwitched",
                    r#"{"Duration":{"nanos":500000000,"secs":1}}"#,
                ),
                (
                    "LastSwitched",
                    r#"{"Duration":{"nanos":500000000,"secs":2}}"#,
                ),
            ],
        );
        let opts = serde_json::to_value(&packets).unwrap().to_string();
        has(
            &opts,
            &[
                r#""scope_fields":[{"System":[0,0,0,3]}]"#,
                r#"["SamplingInterval",{"DataNumber":{"U32":10}}]"#,
                r#"["SamplingAlgorithm",{"DataNumber":{"U8":1}}]"#,
            ],
        );
        assert_eq!((msg.len() - 20) % 4, 0, "sets are padded to 32 bits");
        let e = enc.encode(CLOCK, false, &recs, &mut msg);
        assert_eq!(e.records, 2);
        assert_eq!(u16::from_be_bytes([msg[2], msg[3]]), 2);
        assert_eq!(u32::from_be_bytes([msg[12], msg[13], msg[14], msg[15]]), 1);
    }

    #[test]
    fn v5_fields_read_back_exactly() {
        let mut r = record("10.0.0.1", "10.0.0.2", Direction::ToVm);
        r.id.proto = 6;
        r.tcp_flags = 0x12;
        let mut enc = Encoder::new(FlowVersion::V5, 9, "192.0.2.1".parse().unwrap(), 10);
        let mut msg = Vec::new();
        enc.encode(CLOCK, true, &[r], &mut msg);
        let (packets, _) = json(&msg);
        let got = serde_json::to_value(&packets).unwrap();
        // Sampling: mode 01 (deterministic) in the top bits, interval 10.
        let want = serde_json::json!([{"V5": {
            "header": {"version": 5, "count": 1, "sys_up_time": 10000,
                "unix_secs": 1700000010, "unix_nsecs": 250000000, "flow_sequence": 0,
                "engine_type": 0, "engine_id": 9, "sampling_interval": 0x4000 | 10},
            "flowsets": [{"src_addr": "10.0.0.1", "dst_addr": "10.0.0.2",
                "next_hop": "0.0.0.0", "input": 0, "output": 7, "d_pkts": 3,
                "d_octets": 300, "first": 1500, "last": 2500, "src_port": 5000,
                "dst_port": 53, "pad1": 0, "tcp_flags": 18, "protocol_number": 6,
                "protocol_type": "Tcp", "tos": 104, "src_as": 0, "dst_as": 0,
                "src_mask": 0, "dst_mask": 0, "pad2": 0}]
        }}]);
        assert_eq!(got, want);
    }

    #[test]
    fn v5_skips_ipv6_and_fits_thirty_records() {
        let mut enc = Encoder::new(FlowVersion::V5, 9, "192.0.2.1".parse().unwrap(), 1);
        let mut msg = Vec::new();
        let mut recs = vec![record("2001:db8::1", "2001:db8::2", Direction::FromVm)];
        recs.extend((0..40).map(|_| record("10.0.0.1", "10.0.0.2", Direction::ToVm)));
        let e = enc.encode(CLOCK, true, &recs, &mut msg);
        let max = (MAX_MESSAGE - V5_HEADER) / V5_RECORD;
        assert_eq!((e.consumed, e.records, e.skipped), (max + 1, max, 1));
        assert_eq!(msg.len(), V5_HEADER + max * V5_RECORD);
        let (packets, j) = json(&msg);
        assert_eq!(packets.len(), 1);
        has(
            &j,
            &[
                r#""src_addr":"10.0.0.1""#,
                r#""dst_addr":"10.0.0.2""#,
                r#""d_pkts":3"#,
                r#""d_octets":300"#,
                r#""output":7"#,
                r#""first":1500"#,
                r#""last":2500"#,
                r#""src_port":5000"#,
                r#""dst_port":53"#,
                r#""tos":104"#,
                r#""engine_id":9"#,
                r#""sys_up_time":10000"#,
            ],
        );
        let e = enc.encode(CLOCK, false, &recs[e.consumed..], &mut msg);
        assert_eq!(e.records, 40 - max);
        assert_eq!(
            u32::from_be_bytes([msg[16], msg[17], msg[18], msg[19]]) as usize,
            max
        );
    }

    #[test]
    fn messages_stay_within_the_size_bound() {
        for version in [FlowVersion::V9, FlowVersion::Ipfix] {
            let mut enc = Encoder::new(version, 1, "::1".parse().unwrap(), 1);
            let recs: Vec<_> = (0..100)
                .map(|i| {
                    if i % 3 == 0 {
                        record("2001:db8::1", "2001:db8::2", Direction::FromVm)
                    } else {
                        record("10.0.0.1", "10.0.0.2", Direction::FromVm)
                    }
                })
                .collect();
            let mut msg = Vec::new();
            let mut rest = &recs[..];
            let mut first = true;
            let mut parser = NetflowParser::default();
            let mut decoded = 0;
            while !rest.is_empty() {
                let e = enc.encode(CLOCK, first, rest, &mut msg);
                first = false;
                assert!(e.consumed > 0 && msg.len() <= MAX_MESSAGE, "{}", msg.len());
                let parsed = parser.parse_bytes(&msg);
                assert!(parsed.error.is_none(), "{:?}", parsed.error);
                let j = serde_json::to_value(&parsed.packets).unwrap().to_string();
                decoded += j.matches(r#"{"U16":5000}"#).count();
                rest = &rest[e.consumed..];
            }
            assert_eq!(decoded, 100, "{version}");
        }
    }
}
