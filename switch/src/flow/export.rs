//! Flow export: a monitor's records become NetFlow/IPFIX messages sent to
//! its collectors.
//!
//! [`Exporter`] is sans-IO: it decides when templates go (at start, every
//! `template_refresh`, and every [`TEMPLATE_EVERY`] messages, so that a
//! collector started late learns them soon) and cuts records into messages.
//! [`Collectors`] is the thin I/O part: one connected, non-blocking UDP
//! socket per collector, so that a collector that is down (the kernel
//! reports the ICMP port unreachable on the next send) or unreachable shows
//! up as counted send errors — and a send never waits.

pub use dvs_proto::stats::{CollectorStatus, ExportCounters};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use dvs_proto::NetflowMonitor;

use crate::flow::FlowRecord;
use crate::wire::netflow::{Encoder, ExportClock};

/// Templates are re-sent at least every this many messages.
pub const TEMPLATE_EVERY: u64 = 20;

/// A monitor's exporter, sans-IO.
#[derive(Debug, Clone)]
pub struct Exporter {
    monitor: NetflowMonitor,
    encoder: Encoder,
    last_templates: Option<Duration>,
    since_templates: u64,
    counters: ExportCounters,
    buf: Vec<u8>,
}

impl Exporter {
    /// An exporter of `monitor`'s records with source ID / observation
    /// domain `domain`, sending from `source`.
    pub fn new(monitor: &NetflowMonitor, domain: u32, source: IpAddr) -> Self {
        Exporter {
            encoder: Encoder::new(monitor.version, domain, source, monitor.sampling),
            monitor: monitor.clone(),
            last_templates: None,
            since_templates: 0,
            counters: ExportCounters::default(),
            buf: Vec::new(),
        }
    }

    pub fn monitor(&self) -> &NetflowMonitor {
        &self.monitor
    }

    pub fn counters(&self) -> &ExportCounters {
        &self.counters
    }

    fn templates_due(&self, now: Duration) -> bool {
        self.encoder.has_templates()
            && (self.since_templates >= TEMPLATE_EVERY
                || self
                    .last_templates
                    .is_none_or(|t| now.saturating_sub(t) >= self.monitor.template_refresh))
    }

    /// Build the messages for `records` at `now` (and a template-only one
    /// when templates are due and there is nothing else); `send` gets each
    /// and says whether every collector took it.
    pub fn export(
        &mut self,
        now: Duration,
        clock: ExportClock,
        records: &[FlowRecord],
        mut send: impl FnMut(&[u8]) -> SendResult,
    ) {
        let mut rest = records;
        let mut first = true;
        loop {
            let templates = self.templates_due(now);
            // Templates alone go only when there is nothing else to send.
            if rest.is_empty() && !(templates && first) {
                return;
            }
            first = false;
            let e = self.encoder.encode(clock, templates, rest, &mut self.buf);
            rest = &rest[e.consumed..];
            self.counters.skipped += e.skipped as u64;
            if e.records == 0 && !templates {
                // Only skipped records were left.
                continue;
            }
            if templates {
                self.last_templates = Some(now);
                self.since_templates = 0;
                self.counters.template_messages += 1;
            } else {
                self.since_templates += 1;
            }
            self.counters.messages += 1;
            self.counters.records += e.records as u64;
            let r = send(&self.buf);
            self.counters.sent += r.sent;
            self.counters.send_errors += r.failed;
        }
    }
}

/// How one message fared with the collectors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendResult {
    pub sent: u64,
    pub failed: u64,
}

/// One collector's socket and what went wrong last.
#[derive(Debug)]
struct Collector {
    addr: SocketAddr,
    socket: Option<UdpSocket>,
    last_error: Option<String>,
}

/// The collectors of a monitor: a connected, non-blocking UDP socket each,
/// bound to the exporter's source address.
#[derive(Debug)]
pub struct Collectors {
    source: IpAddr,
    list: Vec<Collector>,
}

impl Collectors {
    /// Sockets to each of `addrs`, sending from `source` (unspecified: the
    /// kernel picks). A socket that cannot be made now is retried on the
    /// next send; its failures are counted.
    pub fn new(addrs: &[SocketAddr], source: IpAddr) -> Self {
        Collectors {
            source,
            list: addrs
                .iter()
                .map(|a| Collector {
                    addr: *a,
                    socket: None,
                    last_error: None,
                })
                .collect(),
        }
    }

    /// Send `msg` to every collector, never waiting.
    pub fn send(&mut self, msg: &[u8]) -> SendResult {
        let mut r = SendResult::default();
        for c in &mut self.list {
            if c.socket.is_none() {
                match open(self.source, c.addr) {
                    Ok(s) => c.socket = Some(s),
                    Err(e) => {
                        note(c, &e);
                        r.failed += 1;
                        continue;
                    }
                }
            }
            let Some(s) = &c.socket else { continue };
            // A refusal can be the ICMP answer to an earlier message (a
            // collector that was not up yet): this one was not sent, so
            // it is tried once more.
            let sent = match s.send(msg) {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    // Counted: an earlier message did not arrive. (A
                    // collector that was down gets the templates with the
                    // next refresh, as UDP export has it.)
                    r.failed += 1;
                    let again = s.send(msg);
                    note(c, &e);
                    again
                }
                other => other,
            };
            match sent {
                Ok(_) => r.sent += 1,
                Err(e) => {
                    note(c, &e);
                    r.failed += 1;
                }
            }
        }
        r
    }

    /// Each collector with the last error seen sending to it.
    pub fn status(&self) -> Vec<CollectorStatus> {
        self.list
            .iter()
            .map(|c| CollectorStatus {
                address: c.addr.to_string(),
                last_error: c.last_error.clone(),
            })
            .collect()
    }
}

fn note(c: &mut Collector, e: &io::Error) {
    if c.last_error.is_none() {
        tracing::warn!(collector = %c.addr, error = %e, "flow export failed; counting failures from now on");
    }
    c.last_error = Some(e.to_string());
}

fn open(source: IpAddr, to: SocketAddr) -> io::Result<UdpSocket> {
    let source = match (source, to) {
        (IpAddr::V4(_), SocketAddr::V4(_)) | (IpAddr::V6(_), SocketAddr::V6(_)) => source,
        (_, SocketAddr::V4(_)) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        (_, SocketAddr::V6(_)) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let s = UdpSocket::bind(SocketAddr::new(source, 0))?;
    s.set_nonblocking(true)?;
    s.connect(to)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{Direction, EndReason, FlowId};
    use dvs_proto::FlowVersion;

    fn monitor(version: FlowVersion, collectors: Vec<SocketAddr>) -> NetflowMonitor {
        NetflowMonitor {
            name: "m".into(),
            version,
            collectors,
            active_timeout: Duration::from_secs(60),
            inactive_timeout: Duration::from_secs(15),
            sampling: 1,
            max_flows: 100,
            template_refresh: Duration::from_secs(30),
        }
    }

    fn rec(i: u16) -> FlowRecord {
        FlowRecord {
            id: FlowId {
                port: 1,
                dir: Direction::FromVm,
                vlan: 10,
                src: "10.0.0.1".parse().unwrap(),
                dst: "10.0.0.2".parse().unwrap(),
                proto: 17,
                src_port: i,
                dst_port: 53,
                tos: 0,
            },
            packets: 1,
            octets: 100,
            first: Duration::ZERO,
            last: Duration::ZERO,
            tcp_flags: 0,
            end: EndReason::Idle,
        }
    }

    const CLOCK: ExportClock = ExportClock {
        uptime_ms: 0,
        unix_ms: 1_700_000_000_000,
    };

    #[test]
    fn templates_go_first_and_are_refreshed_by_time_and_count() {
        let mut x = Exporter::new(
            &monitor(FlowVersion::Ipfix, vec![]),
            1,
            "127.0.0.1".parse().unwrap(),
        );
        let msgs = std::cell::RefCell::new(Vec::<Vec<u8>>::new());
        let send = |m: &[u8]| {
            msgs.borrow_mut().push(m.to_vec());
            SendResult { sent: 1, failed: 0 }
        };
        // Nothing to send, but templates are due: a template-only message.
        x.export(Duration::ZERO, CLOCK, &[], send);
        x.export(Duration::from_secs(1), CLOCK, &[], send);
        x.export(Duration::from_secs(1), CLOCK, &[rec(1)], send);
        x.export(Duration::from_secs(31), CLOCK, &[], send);
        assert_eq!(msgs.borrow().len(), 3);
        // 2000 records: many messages, with templates again every 20.
        let recs: Vec<_> = (0..2000).map(rec).collect();
        x.export(Duration::from_secs(32), CLOCK, &recs, send);
        assert_eq!(x.counters().records, 2001);
        assert!(x.counters().template_messages >= 3, "{:?}", x.counters());
        let mut parser = netflow_parser::NetflowParser::default();
        for m in msgs.borrow().iter() {
            assert!(parser.parse_bytes(m).error.is_none());
        }
    }

    #[test]
    fn a_collector_that_is_down_is_counted_and_never_blocks() {
        // A port nobody listens on: the kernel answers port unreachable and
        // the connected socket reports it on a later send.
        let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
        let down = probe.local_addr().unwrap();
        drop(probe);
        let up = UdpSocket::bind("127.0.0.1:0").unwrap();
        up.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let m = monitor(FlowVersion::V9, vec![down, up.local_addr().unwrap()]);
        let mut x = Exporter::new(&m, 1, "127.0.0.1".parse().unwrap());
        let mut cs = Collectors::new(&m.collectors, "127.0.0.1".parse().unwrap());
        let t = std::time::Instant::now();
        for i in 0..50 {
            x.export(Duration::from_secs(i), CLOCK, &[rec(i as u16)], |b| {
                cs.send(b)
            });
        }
        assert!(t.elapsed() < Duration::from_secs(1));
        let c = x.counters();
        assert_eq!((c.messages, c.records), (50, 50), "{c:?}");
        assert!(c.send_errors > 0, "{c:?}");
        // Every message was sent to both (a refusal is counted as an error
        // of the earlier message, and the message sent again).
        assert_eq!(c.sent, 100, "{c:?}");
        let st = cs.status();
        assert!(
            st[0]
                .last_error
                .as_deref()
                .unwrap_or("")
                .contains("refused"),
            "{st:?}"
        );
        assert!(st[1].last_error.is_none());
        let mut buf = [0u8; 2000];
        assert!(up.recv(&mut buf).unwrap() > 20);
    }
}
