//! The snapshot of a port with 10k tracked connections (the issue's
//! figure): its size, and how long taking, encoding, decoding and restoring
//! it take — the part of a migration's transfer that is the switch's, not
//! the network's. Medians of 21 rounds.
//!
//! Run: `cargo bench -p dvs-migrate --bench snapshot`.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use dvs_migrate::snapshot::{Kind, Snapshot};
use dvs_proto::PortId;
use dvs_switch::tracked_port_state;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    for conns in [1_000u32, 10_000, 100_000] {
        let state = tracked_port_state(conns);
        assert_eq!(state.conntrack.len(), conns as usize);
        let s = Snapshot {
            port: PortId::new(1).unwrap(),
            migration: 1,
            seq: 0,
            kind: Kind::Full,
            state,
        };
        let (mut enc, mut dec) = (Vec::new(), Vec::new());
        let mut bytes = Vec::new();
        for _ in 0..21 {
            let t = Instant::now();
            bytes = s.encode().unwrap();
            enc.push(t.elapsed());
            let t = Instant::now();
            let back: Snapshot<dvs_switch::PortState> = Snapshot::decode(&bytes).unwrap();
            dec.push(t.elapsed());
            assert_eq!(back.state.conntrack.len(), conns as usize);
        }
        println!(
            "{conns:>6} tracked connections: snapshot {:.1} KB ({:.0} B per connection); encode {:.2} ms, decode {:.2} ms (medians of 21)",
            bytes.len() as f64 / 1024.0,
            bytes.len() as f64 / f64::from(conns),
            median(enc).as_secs_f64() * 1e3,
            median(dec).as_secs_f64() * 1e3,
        );
    }
}
