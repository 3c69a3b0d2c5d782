//! IPFIX (RFC 7011) messages for flow records.
//!
//! Two templates — IPv4 (256) and IPv6 (257) — carry the flow key, the
//! interfaces (the port's chassis-wide number: ingress for what a VM sent,
//! egress for what it received), the VLAN (IE 58), packet and octet deltas,
//! flowStart/EndMilliseconds (IE 152/153: nfdump mis-reads the sysUpTime
//! forms) and flowEndReason. The sequence number counts the data records
//! sent before each message, per observation domain (the chassis).

use crate::flow::{Direction, FlowRecord};

/// The templates' fields: (information element, length).
const V4_FIELDS: &[(u16, u16)] = &[
    (8, 4),   // sourceIPv4Address
    (12, 4),  // destinationIPv4Address
    (4, 1),   // protocolIdentifier
    (7, 2),   // sourceTransportPort
    (11, 2),  // destinationTransportPort
    (5, 1),   // ipClassOfService
    (6, 1),   // tcpControlBits
    (10, 4),  // ingressInterface
    (14, 4),  // egressInterface
    (58, 2),  // vlanId
    (2, 8),   // packetDeltaCount
    (1, 8),   // octetDeltaCount
    (152, 8), // flowStartMilliseconds
    (153, 8), // flowEndMilliseconds
    (136, 1), // flowEndReason
];

const V6_FIELDS: &[(u16, u16)] = &[
    (27, 16), // sourceIPv6Address
    (28, 16), // destinationIPv6Address
    (4, 1),
    (7, 2),
    (11, 2),
    (5, 1),
    (6, 1),
    (10, 4),
    (14, 4),
    (58, 2),
    (2, 8),
    (1, 8),
    (152, 8),
    (153, 8),
    (136, 1),
];

pub const TEMPLATE_V4: u16 = 256;
pub const TEMPLATE_V6: u16 = 257;
const HEADER_LEN: usize = 16;

/// Builds IPFIX messages for one observation domain.
#[derive(Debug, Clone)]
pub struct IpfixEncoder {
    domain: u32,
    /// Data records sent so far (the next message's sequence number).
    sequence: u32,
}

impl IpfixEncoder {
    pub fn new(domain: u32) -> Self {
        IpfixEncoder {
            domain,
            sequence: 0,
        }
    }

    /// Write one message into `out` (cleared first): the templates when
    /// `templates` is set, then `records`. `export_s` is the export time
    /// (UNIX seconds) and `base_ms` the UNIX time in ms of the flow clock's
    /// zero. Returns the number of data records written.
    pub fn encode(
        &mut self,
        export_s: u32,
        base_ms: u64,
        templates: bool,
        records: &[FlowRecord],
        out: &mut Vec<u8>,
    ) -> usize {
        out.clear();
        out.resize(HEADER_LEN, 0);
        if templates {
            let start = out.len();
            put16(out, 2);
            put16(out, 0);
            for (id, fields) in [(TEMPLATE_V4, V4_FIELDS), (TEMPLATE_V6, V6_FIELDS)] {
                put16(out, id);
                put16(out, fields.len() as u16);
                for (ie, len) in fields {
                    put16(out, *ie);
                    put16(out, *len);
                }
            }
            set_len(out, start);
        }
        let mut written = 0;
        for v6 in [false, true] {
            let mine: Vec<&FlowRecord> = records
                .iter()
                .filter(|r| r.id.src.is_ipv6() == v6)
                .collect();
            if mine.is_empty() {
                continue;
            }
            let start = out.len();
            put16(out, if v6 { TEMPLATE_V6 } else { TEMPLATE_V4 });
            put16(out, 0);
            for r in mine {
                write_record(out, r, base_ms);
                written += 1;
            }
            set_len(out, start);
        }
        let len = out.len() as u16;
        out[0..2].copy_from_slice(&10u16.to_be_bytes());
        out[2..4].copy_from_slice(&len.to_be_bytes());
        out[4..8].copy_from_slice(&export_s.to_be_bytes());
        out[8..12].copy_from_slice(&self.sequence.to_be_bytes());
        out[12..16].copy_from_slice(&self.domain.to_be_bytes());
        self.sequence = self.sequence.wrapping_add(written as u32);
        written
    }
}

fn put16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn set_len(out: &mut [u8], start: usize) {
    let len = (out.len() - start) as u16;
    out[start + 2..start + 4].copy_from_slice(&len.to_be_bytes());
}

fn write_record(out: &mut Vec<u8>, r: &FlowRecord, base_ms: u64) {
    match (r.id.src, r.id.dst) {
        (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => {
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |a: std::net::IpAddr| match a {
                std::net::IpAddr::V6(a) => a.octets(),
                std::net::IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            };
            out.extend_from_slice(&v6(s));
            out.extend_from_slice(&v6(d));
        }
    }
    out.push(r.id.proto);
    out.extend_from_slice(&r.id.src_port.to_be_bytes());
    out.extend_from_slice(&r.id.dst_port.to_be_bytes());
    out.push(r.id.tos);
    out.push(r.tcp_flags);
    let (ingress, egress) = match r.id.dir {
        Direction::FromVm => (r.id.port, 0),
        Direction::ToVm => (0, r.id.port),
    };
    out.extend_from_slice(&ingress.to_be_bytes());
    out.extend_from_slice(&egress.to_be_bytes());
    out.extend_from_slice(&r.id.vlan.to_be_bytes());
    out.extend_from_slice(&r.packets.to_be_bytes());
    out.extend_from_slice(&r.octets.to_be_bytes());
    out.extend_from_slice(&(base_ms + r.first.as_millis() as u64).to_be_bytes());
    out.extend_from_slice(&(base_ms + r.last.as_millis() as u64).to_be_bytes());
    out.push(r.end.code());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{EndReason, FlowId};
    use std::time::Duration;

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

    #[test]
    fn an_independent_decoder_reads_every_field() {
        let mut enc = IpfixEncoder::new(42);
        let mut msg = Vec::new();
        let recs = [
            record("10.0.0.1", "10.0.0.2", Direction::FromVm),
            record("2001:db8::1", "2001:db8::2", Direction::ToVm),
        ];
        assert_eq!(
            enc.encode(1_700_000_000, 1_700_000_000_000, true, &recs, &mut msg),
            2
        );
        let parsed = netflow_parser::NetflowParser::default().parse_bytes(&msg);
        assert!(parsed.error.is_none(), "{:?}", parsed.error);
        let json = serde_json::to_value(&parsed.packets).unwrap().to_string();
        for want in [
            r#"{"Ip4Addr":"10.0.0.1"}"#,
            r#"{"Ip4Addr":"10.0.0.2"}"#,
            r#"{"Ip6Addr":"2001:db8::1"}"#,
            r#"{"U16":5000}"#,
            r#"{"U16":53}"#,
            r#"{"U8":104}"#,
            r#"{"U32":7}"#,
            r#"{"U16":10}"#,
            r#"{"U64":3}"#,
            r#"{"U64":300}"#,
            r#"{"nanos":500000000,"secs":1700000001}"#,
            r#"{"nanos":500000000,"secs":1700000002}"#,
        ] {
            assert!(json.contains(want), "{want} missing in {json}");
        }
        // The next message continues the sequence.
        enc.encode(
            1_700_000_001,
            1_700_000_000_000,
            false,
            &recs[..1],
            &mut msg,
        );
        assert_eq!(u32::from_be_bytes([msg[8], msg[9], msg[10], msg[11]]), 2);
        assert_eq!(u16::from_be_bytes([msg[2], msg[3]]) as usize, msg.len());
    }
}
