//! The port-state snapshot that travels from the source host to the
//! destination during a migration: a versioned envelope with a CRC and a
//! size bound around the port's runtime state (counters, rule hits, policer
//! buckets, tracked connections, sticky MACs, open flow records — see
//! `dvs_switch::PortState`).
//!
//! ```text
//!  0      4        6        8              12             16
//!  +------+--------+--------+--------------+--------------+------------
//!  | DVSS | version| kind   | payload len  | CRC-32(IEEE) | payload (JSON)
//!  +------+--------+--------+--------------+--------------+------------
//! ```
//!
//! `kind` is 1 for a full snapshot, 2 for a delta (the state a port built
//! since the last one was taken: the destination merges it). A snapshot
//! that is truncated, corrupted, too big or of an unknown version is
//! refused whole with the reason; nothing of it is applied.

use dvs_proto::PortId;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The envelope's magic bytes.
pub const MAGIC: &[u8; 4] = b"DVSS";
/// The format this code writes (and the only one it reads).
pub const VERSION: u16 = 1;
/// The largest payload accepted: a port with 100k tracked connections
/// fits with room to spare.
pub const MAX_PAYLOAD: usize = 64 << 20;
const HEADER: usize = 16;
/// Snapshots travel in pieces of this size (a gRPC message stays small).
pub const CHUNK: usize = 1 << 20;

/// `bytes` (an encoded snapshot) cut into pieces of at most [`CHUNK`],
/// each with whether more follow: how both the source's events and the
/// controller's commands carry a snapshot.
pub fn pieces(bytes: &[u8]) -> impl Iterator<Item = (&[u8], bool)> {
    let n = bytes.len().div_ceil(CHUNK);
    bytes
        .chunks(CHUNK)
        .enumerate()
        .map(move |(i, c)| (c, i + 1 < n))
}

/// Full state, or what changed since the previous snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    Full,
    Delta,
}

impl Kind {
    fn code(self) -> u16 {
        match self {
            Kind::Full => 1,
            Kind::Delta => 2,
        }
    }
}

/// A port's runtime state in flight (`S`: the datapath's state of a port,
/// `dvs_switch::PortState`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot<S> {
    pub port: PortId,
    /// The migration it belongs to.
    pub migration: u64,
    /// Position in the migration's stream of snapshots (0: the first, full).
    pub seq: u32,
    pub kind: Kind,
    pub state: S,
}

/// Why a snapshot was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("snapshot truncated: {have} bytes, the header says {need}")]
    Truncated { have: usize, need: usize },
    #[error("not a dvs snapshot: it starts with {0:02x?}, expected \"DVSS\"")]
    Magic([u8; 4]),
    #[error("snapshot format version {0} is not one this dvs reads (it reads {VERSION})")]
    Version(u16),
    #[error("snapshot kind {0} is unknown: 1 (full) or 2 (delta)")]
    Kind(u16),
    #[error("snapshot of {len} bytes is over the bound of {max} bytes")]
    TooBig { len: usize, max: usize },
    #[error("snapshot corrupted: CRC-32 {got:08x}, the header says {want:08x}")]
    Crc { want: u32, got: u32 },
    #[error("snapshot payload does not decode: {0}")]
    Payload(String),
    #[error("the snapshot says {said:?} in its header but {found:?} inside")]
    Mismatch { said: Kind, found: Kind },
}

/// Check an envelope without reading its payload (magic, version, kind,
/// size bound, length, CRC): what a relay that does not need the state
/// checks. Returns the kind and the payload.
///
/// # Errors
/// [`SnapshotError`] naming what is wrong.
pub fn check(b: &[u8]) -> Result<(Kind, &[u8]), SnapshotError> {
    let Some(h) = b.get(..HEADER) else {
        return Err(SnapshotError::Truncated {
            have: b.len(),
            need: HEADER,
        });
    };
    let magic = [h[0], h[1], h[2], h[3]];
    if &magic != MAGIC {
        return Err(SnapshotError::Magic(magic));
    }
    let version = u16::from_be_bytes([h[4], h[5]]);
    if version != VERSION {
        return Err(SnapshotError::Version(version));
    }
    let kind = match u16::from_be_bytes([h[6], h[7]]) {
        1 => Kind::Full,
        2 => Kind::Delta,
        k => return Err(SnapshotError::Kind(k)),
    };
    let len = u32::from_be_bytes([h[8], h[9], h[10], h[11]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(SnapshotError::TooBig {
            len,
            max: MAX_PAYLOAD,
        });
    }
    let want = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
    let Some(payload) = b.get(HEADER..HEADER + len) else {
        return Err(SnapshotError::Truncated {
            have: b.len(),
            need: HEADER + len,
        });
    };
    let got = crc32fast::hash(payload);
    if got != want {
        return Err(SnapshotError::Crc { want, got });
    }
    Ok((kind, payload))
}

impl<S: Serialize + DeserializeOwned> Snapshot<S> {
    /// The envelope's bytes.
    ///
    /// # Errors
    /// [`SnapshotError::TooBig`] when the state exceeds [`MAX_PAYLOAD`].
    pub fn encode(&self) -> Result<Vec<u8>, SnapshotError> {
        let payload =
            serde_json::to_vec(self).map_err(|e| SnapshotError::Payload(e.to_string()))?;
        if payload.len() > MAX_PAYLOAD {
            return Err(SnapshotError::TooBig {
                len: payload.len(),
                max: MAX_PAYLOAD,
            });
        }
        let mut out = Vec::with_capacity(HEADER + payload.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.extend_from_slice(&self.kind.code().to_be_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&crc32fast::hash(&payload).to_be_bytes());
        out.extend_from_slice(&payload);
        Ok(out)
    }

    /// Check and read an envelope.
    ///
    /// # Errors
    /// [`SnapshotError`] naming what is wrong; nothing is returned then.
    pub fn decode(b: &[u8]) -> Result<Snapshot<S>, SnapshotError> {
        let (kind, payload) = check(b)?;
        let s: Snapshot<S> =
            serde_json::from_slice(payload).map_err(|e| SnapshotError::Payload(e.to_string()))?;
        if s.kind != kind {
            return Err(SnapshotError::Mismatch {
                said: kind,
                found: s.kind,
            });
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dvs_switch::{tracked_port_state, PortState};

    type Snapshot = super::Snapshot<PortState>;

    fn snapshot(conns: u32) -> Snapshot {
        Snapshot {
            port: PortId::new(7).unwrap(),
            migration: 42,
            seq: 0,
            kind: Kind::Full,
            state: tracked_port_state(conns),
        }
    }

    #[test]
    fn a_snapshot_round_trips_with_its_connections() {
        let s = snapshot(100);
        assert_eq!(s.state.conntrack.len(), 100);
        let b = s.encode().unwrap();
        assert_eq!(&b[..4], b"DVSS");
        assert_eq!(Snapshot::decode(&b).unwrap(), s);
    }

    #[test]
    fn broken_snapshots_are_refused_with_the_reason() {
        let b = snapshot(10).encode().unwrap();
        assert_eq!(
            Snapshot::decode(&b[..b.len() - 5]).unwrap_err(),
            SnapshotError::Truncated {
                have: b.len() - 5,
                need: b.len()
            }
        );
        assert!(matches!(
            Snapshot::decode(&b[..10]).unwrap_err(),
            SnapshotError::Truncated { have: 10, need: 16 }
        ));
        let mut c = b.clone();
        c[HEADER + 20] ^= 0x01;
        assert!(matches!(
            Snapshot::decode(&c).unwrap_err(),
            SnapshotError::Crc { .. }
        ));
        let mut v = b.clone();
        v[5] = 9;
        assert_eq!(
            Snapshot::decode(&v).unwrap_err().to_string(),
            "snapshot format version 9 is not one this dvs reads (it reads 1)"
        );
        let mut m = b.clone();
        m[0] = b'X';
        assert!(Snapshot::decode(&m)
            .unwrap_err()
            .to_string()
            .starts_with("not a dvs snapshot"));
        let mut big = b.clone();
        big[8..12].copy_from_slice(&((MAX_PAYLOAD + 1) as u32).to_be_bytes());
        assert!(matches!(
            Snapshot::decode(&big).unwrap_err(),
            SnapshotError::TooBig { .. }
        ));
        let mut k = b;
        k[7] = 2;
        assert!(matches!(
            Snapshot::decode(&k).unwrap_err(),
            SnapshotError::Mismatch { .. }
        ));
    }
}
