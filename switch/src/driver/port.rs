//! What the driver needs of a port's device ([`PortIo`]) and of the VXLAN
//! uplink ([`Uplink`] over an [`Underlay`]: a UDP socket in the agent, an
//! in-memory fabric in the lab), and the buffer sizes both sides of the
//! driver share.

use std::io::{self, IoSlice};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};

use crate::driver::sys::{self, StrippedTag};
use crate::wire::VnetHdr;

/// Bytes kept free before every received frame: room to re-insert a tag the
/// kernel stripped and to write a VXLAN header in place.
pub const HEADROOM: usize = 64;
/// The largest frame or datagram read (a 64 KB GSO frame fits).
pub const MAX_READ: usize = 65_535 + 14 + 8 + 8;
/// Frames read from one source per wakeup before moving to the next.
pub const BATCH: usize = 64;

/// What a port's read returned besides the bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RxMeta {
    /// Length of the frame now at the start of the buffer.
    pub len: usize,
    /// A VLAN tag the kernel took off (AF_PACKET); the driver puts it back.
    pub tag: Option<StrippedTag>,
    /// The virtio-net header of a port with offloads.
    pub vnet: Option<VnetHdr>,
}

/// A port's device, as the driver sees it.
pub trait PortIo {
    /// Read one frame into `buf`; `WouldBlock` when none is waiting,
    /// `InvalidData` when it did not fit.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<RxMeta>;
    /// Send one frame gathered from `parts`. `vnet` is `Some` exactly when
    /// the port [`offloads`](PortIo::offloads).
    fn send(&mut self, vnet: Option<&VnetHdr>, parts: &[IoSlice<'_>]) -> io::Result<()>;
    /// The fd to wait on, when the port has one.
    fn raw_fd(&self) -> Option<RawFd>;
    /// Whether the port takes and gives virtio-net headers: checksum-partial
    /// and 64 KB GSO frames pass through it whole.
    fn offloads(&self) -> bool {
        false
    }
    /// A second handle on the same device, for the transmit side.
    fn try_clone(&self) -> io::Result<Self>
    where
        Self: Sized;
}

/// The network under the tunnels, as the driver sees it: datagrams to and
/// from other tunnel endpoints.
pub trait Underlay: Send + std::fmt::Debug {
    /// Receive one datagram into `buf` — or several of one size coalesced
    /// (UDP GRO) — and say its length, its sender and the segment size
    /// when coalesced; `WouldBlock` when none is waiting.
    fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<usize>)>;
    /// Send one datagram.
    fn send(&self, datagram: &[u8], dst: SocketAddr) -> io::Result<()>;
    /// Send `buf` as datagrams of `segment` bytes each (the last may be
    /// shorter): one call for many (UDP GSO).
    fn send_segmented(&self, buf: &[u8], segment: usize, dst: SocketAddr) -> io::Result<()>;
    /// The fd to wait on, when it has one.
    fn raw_fd(&self) -> Option<RawFd>;
    /// A second handle on the same endpoint, for the transmit side.
    fn try_clone(&self) -> io::Result<Box<dyn Underlay>>;
}

impl Underlay for UdpSocket {
    fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<usize>)> {
        sys::recv_gro(self.as_raw_fd(), buf)
    }

    fn send(&self, datagram: &[u8], dst: SocketAddr) -> io::Result<()> {
        self.send_to(datagram, dst).map(drop)
    }

    fn send_segmented(&self, buf: &[u8], segment: usize, dst: SocketAddr) -> io::Result<()> {
        if buf.len() <= segment {
            return self.send_to(buf, dst).map(drop);
        }
        let seg =
            u16::try_from(segment).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        sys::send_gso(self.as_raw_fd(), buf, seg, dst).map(drop)
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }

    fn try_clone(&self) -> io::Result<Box<dyn Underlay>> {
        Ok(Box::new(UdpSocket::try_clone(self)?))
    }
}

/// The VXLAN uplink: the host's tunnel endpoint on the underlay.
#[derive(Debug)]
pub struct Uplink {
    pub underlay: Box<dyn Underlay>,
    /// The UDP port of remote tunnel endpoints.
    pub remote_port: u16,
}

impl Uplink {
    /// Bind the tunnel endpoint at `local`, non-blocking, with UDP GRO on.
    ///
    /// # Errors
    /// The socket errors, with the address in the message.
    pub fn bind(local: SocketAddr, remote_port: u16) -> Result<Self, crate::Error> {
        let socket = UdpSocket::bind(local)
            .map_err(|e| crate::Error::io(format!("binding the VXLAN socket to {local}"), e))?;
        socket
            .set_nonblocking(true)
            .map_err(|e| crate::Error::io("setting the VXLAN socket non-blocking", e))?;
        sys::enable_udp_gro(socket.as_raw_fd())
            .map_err(|e| crate::Error::io("enabling UDP GRO on the VXLAN socket", e))?;
        // A burst of segmented 64 KB frames from a peer must not overflow
        // the default ~200 KB while the switch thread is busy.
        sys::set_recv_buffer(socket.as_raw_fd(), UPLINK_RCVBUF)
            .map_err(|e| crate::Error::io("sizing the VXLAN socket's receive buffer", e))?;
        Ok(Self {
            underlay: Box::new(socket),
            remote_port,
        })
    }

    /// A second handle on the same endpoint, for the transmit side.
    ///
    /// # Errors
    /// Cloning the underlay's handle failed.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            underlay: self.underlay.try_clone()?,
            remote_port: self.remote_port,
        })
    }
}

/// The VXLAN socket's receive buffer.
const UPLINK_RCVBUF: i32 = 4 << 20;
