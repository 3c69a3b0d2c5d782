//! System calls: TAP devices, AF_PACKET sockets, link flags, poll, signals.
//!
//! The only module of dvs allowed `unsafe`; each block says why it is sound.
//! Everything here returns `std::io::Result` and leaves policy to callers.

#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const IFNAMSIZ: usize = 16;

/// `struct ifreq` with the two members we use (name, flags), padded to the
/// kernel's 40 bytes.
#[repr(C)]
struct IfReq {
    name: [libc::c_char; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str) -> io::Result<Self> {
        if name.is_empty() || name.len() >= IFNAMSIZ || name.contains(['/', ' ', '\0']) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "interface name `{name}` is not valid: 1 to 15 characters, no '/' or spaces"
                ),
            ));
        }
        let mut r = IfReq {
            name: [0; IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        for (d, s) in r.name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        Ok(r)
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Create (or attach to) the TAP device `name`, without packet information,
/// non-blocking. The device lives as long as the returned file unless it was
/// made persistent by someone else.
///
/// With `offloads`, every read and write carries a 12-byte virtio-net header
/// and the VM side may send checksum-partial and TSO frames of up to 64 KB
/// (`TUNSETVNETHDRSZ` 12, `TUNSETOFFLOAD` CSUM | TSO4 | TSO6 | TSO_ECN).
pub fn open_tap(name: &str, offloads: bool) -> io::Result<File> {
    let mut req = IfReq::new(name)?;
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
    if offloads {
        flags |= libc::IFF_VNET_HDR;
    }
    req.flags = flags as libc::c_short;
    // SAFETY: the path is a valid NUL-terminated string; open has no other
    // preconditions.
    let fd = cvt(unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: fd was just returned by open and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` is one, laid
    // out as the kernel expects, and outlives the call.
    cvt(unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) })?;
    if offloads {
        let size: libc::c_int = 12;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
        cvt(unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                libc::TUNSETVNETHDRSZ,
                &size as *const libc::c_int,
            )
        })?;
        let off = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        cvt(unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETOFFLOAD, off as libc::c_ulong) })?;
    }
    Ok(file)
}

/// Scattered read of one frame from `fd` into `parts` (a TAP's virtio-net
/// header and the frame land in separate buffers).
pub fn readv(fd: RawFd, parts: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
    // SAFETY: IoSliceMut is ABI-compatible with iovec; the buffers are live
    // and writable for their lengths.
    let n = unsafe { libc::readv(fd, parts.as_ptr().cast(), parts.len() as libc::c_int) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;

/// Give a socket a receive buffer of `bytes`: beyond `net.core.rmem_max`
/// when privileged (SO_RCVBUFFORCE), else as much as that allows.
pub fn set_recv_buffer(fd: RawFd, bytes: i32) -> io::Result<()> {
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &bytes)
        .or_else(|_| setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &bytes))
}

/// Ask the kernel to coalesce received datagrams of one flow (UDP GRO);
/// [`recv_gro`] then reports the segment size.
pub fn enable_udp_gro(fd: RawFd) -> io::Result<()> {
    setsockopt(fd, SOL_UDP, UDP_GRO, &1i32)
}

/// Receive one datagram — or, with UDP GRO, several of equal size back to
/// back — into `buf`. Returns the length, the sender and the segment size
/// when the kernel coalesced.
pub fn recv_gro(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<usize>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: sockaddr_storage and msghdr are plain data; zero is valid.
    let mut addr: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut cbuf = [0u64; 8];
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_name = (&mut addr as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = mem::size_of_val(&cbuf);
    // SAFETY: every pointer in msg refers to a live buffer of the given size.
    let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut seg = None;
    // SAFETY: msg was filled by recvmsg; CMSG_* stay within msg_control.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == SOL_UDP && (*c).cmsg_type == UDP_GRO {
                let v: libc::c_int = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                seg = usize::try_from(v).ok().filter(|v| *v > 0);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let from =
        sockaddr_to_std(&addr).ok_or_else(|| io::Error::other("datagram from a non-IP sender"))?;
    Ok((n as usize, from, seg))
}

/// Send `buf` to `dst` as datagrams of `seg` bytes each (the last may be
/// shorter) in one call: UDP GSO (`UDP_SEGMENT`).
pub fn send_gso(fd: RawFd, buf: &[u8], seg: u16, dst: SocketAddr) -> io::Result<usize> {
    let (addr, alen) = std_to_sockaddr(dst);
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 4];
    // SAFETY: msghdr is plain data; zero is valid.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_name = (&addr as *const libc::sockaddr_storage) as *mut libc::c_void;
    msg.msg_namelen = alen;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(mem::size_of::<u16>() as u32) } as usize;
    // SAFETY: the control buffer holds one cmsg with a u16 payload (checked
    // size above); the kernel only reads from buf.
    let n = unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = SOL_UDP;
        (*c).cmsg_type = UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(mem::size_of::<u16>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
        libc::sendmsg(fd, &msg, 0)
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn sockaddr_to_std(a: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(a.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let s: &libc::sockaddr_in = unsafe { &*(a as *const libc::sockaddr_storage).cast() };
            Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(u32::from_be(s.sin_addr.s_addr))),
                u16::from_be(s.sin_port),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let s: &libc::sockaddr_in6 = unsafe { &*(a as *const libc::sockaddr_storage).cast() };
            Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(s.sin6_addr.s6_addr)),
                u16::from_be(s.sin6_port),
            ))
        }
        _ => None,
    }
}

fn std_to_sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: plain data; zero is valid.
    let mut st: libc::sockaddr_storage = unsafe { mem::zeroed() };
    match a {
        SocketAddr::V4(v) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let s: &mut libc::sockaddr_in =
                unsafe { &mut *(&mut st as *mut libc::sockaddr_storage).cast() };
            s.sin_family = libc::AF_INET as libc::sa_family_t;
            s.sin_port = v.port().to_be();
            s.sin_addr.s_addr = u32::from(*v.ip()).to_be();
            (st, mem::size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        SocketAddr::V6(v) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in6.
            let s: &mut libc::sockaddr_in6 =
                unsafe { &mut *(&mut st as *mut libc::sockaddr_storage).cast() };
            s.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            s.sin6_port = v.port().to_be();
            s.sin6_addr.s6_addr = v.ip().octets();
            (st, mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

/// Set `IFF_UP` on the interface `name` (in the caller's namespace).
pub fn set_link_up(name: &str) -> io::Result<()> {
    let sock = socket(libc::AF_INET, libc::SOCK_DGRAM, 0)?;
    let mut req = IfReq::new(name)?;
    // SAFETY: SIOCGIFFLAGS fills the flags of a valid `struct ifreq`.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req as *mut IfReq) })?;
    req.flags |= libc::IFF_UP as libc::c_short;
    // SAFETY: as above; SIOCSIFFLAGS only reads the request.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req as *mut IfReq) })?;
    Ok(())
}

/// The index of interface `name`; the OS's error (`ENODEV`, "No such
/// device") when there is none.
pub fn ifindex(name: &str) -> io::Result<u32> {
    let c = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(i)
    }
}

fn socket(domain: libc::c_int, ty: libc::c_int, proto: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain system call; the result is checked before use.
    let fd = cvt(unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) })?;
    // SAFETY: fd was just returned by socket and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, val: &T) -> io::Result<()> {
    // SAFETY: `val` points to a live T of the given size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (val as *const T).cast(),
            mem::size_of::<T>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// A raw AF_PACKET socket bound to one interface: the switch's side of an
/// interface that somebody else made (a VMM's tap, a veth).
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
    /// The interface it is bound to.
    index: u32,
}

/// A VLAN tag the kernel took off a received frame (PACKET_AUXDATA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StrippedTag {
    pub tpid: u16,
    pub tci: u16,
}

impl PacketSocket {
    /// Open a non-blocking raw socket on `ifname` that sees every frame the
    /// interface receives (promiscuous), not the ones sent through it.
    pub fn open(ifname: &str) -> io::Result<Self> {
        let index = ifindex(ifname)?;
        let proto = (libc::ETH_P_ALL as u16).to_be();
        let fd = socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK,
            libc::c_int::from(proto),
        )?;
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = index as i32;
        // SAFETY: addr is a valid sockaddr_ll and its size is passed.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        })?;
        setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_AUXDATA,
            &1i32,
        )?;
        // Frames carry a virtio-net header: GSO frames and partial checksums
        // of the owner's offloads are described instead of arriving unfinished.
        setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_VNET_HDR,
            &1i32,
        )?;
        setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_IGNORE_OUTGOING,
            &1i32,
        )?;
        let mreq = libc::packet_mreq {
            mr_ifindex: index as i32,
            mr_type: libc::PACKET_MR_PROMISC as u16,
            mr_alen: 0,
            mr_address: [0; 8],
        };
        setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_ADD_MEMBERSHIP,
            &mreq,
        )?;
        Ok(Self { fd, index })
    }

    /// The index of the interface the socket is bound to.
    pub fn ifindex(&self) -> u32 {
        self.index
    }

    /// Receive one frame into `buf` and its 10-byte virtio-net header into
    /// `vnet`; returns the frame's length and the VLAN tag the kernel
    /// stripped from it, if any. `WouldBlock` when nothing is queued.
    pub fn recv(
        &self,
        vnet: &mut [u8; 10],
        buf: &mut [u8],
    ) -> io::Result<(usize, Option<StrippedTag>)> {
        let mut iov = [
            libc::iovec {
                iov_base: vnet.as_mut_ptr().cast(),
                iov_len: vnet.len(),
            },
            libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            },
        ];
        // Room for one cmsg carrying a tpacket_auxdata, 8-byte aligned.
        let mut cbuf = [0u64; 8];
        // SAFETY: msghdr is plain data; all-zero is valid.
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = iov.len();
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = mem::size_of_val(&cbuf);
        // SAFETY: msg points to live buffers (iov → vnet and buf, control →
        // cbuf) whose sizes are given; the kernel writes within them.
        let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, libc::MSG_TRUNC) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = (n as usize).saturating_sub(vnet.len());
        if n > buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "frame of {n} bytes does not fit the {}-byte buffer",
                    buf.len()
                ),
            ));
        }
        let mut tag = None;
        // SAFETY: msg was filled by recvmsg; CMSG_* walk within msg_control.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_PACKET && (*c).cmsg_type == libc::PACKET_AUXDATA {
                    let aux: libc::tpacket_auxdata =
                        std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    if aux.tp_status & libc::TP_STATUS_VLAN_VALID != 0 {
                        let tpid = if aux.tp_status & libc::TP_STATUS_VLAN_TPID_VALID != 0 {
                            aux.tp_vlan_tpid
                        } else {
                            0x8100
                        };
                        tag = Some(StrippedTag {
                            tpid,
                            tci: aux.tp_vlan_tci,
                        });
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        Ok((n, tag))
    }

    /// A second handle on the same socket (for another thread).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            fd: self.fd.try_clone()?,
            index: self.index,
        })
    }

    /// Send `parts` (gathered) as one frame out of the interface; the first
    /// part must be the 10-byte virtio-net header.
    pub fn send(&self, parts: &[io::IoSlice<'_>]) -> io::Result<usize> {
        writev(self.fd.as_raw_fd(), parts)
    }
}

impl AsRawFd for PacketSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A route-netlink socket: subscribed to link changes
/// ([`LinkMonitor::subscribe`]: interfaces appearing, changing, going), or
/// for asking about one interface ([`LinkMonitor::query`]).
#[derive(Debug)]
pub struct LinkMonitor {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

const RTMGRP_LINK: u32 = 1;

impl LinkMonitor {
    /// A non-blocking socket that hears every link change in the caller's
    /// network namespace.
    pub fn subscribe() -> io::Result<Self> {
        Self::open(RTMGRP_LINK, libc::SOCK_NONBLOCK)
    }

    /// A socket for requests ([`LinkMonitor::link`]), hearing nothing else.
    pub fn query() -> io::Result<Self> {
        let m = Self::open(0, 0)?;
        // A request is answered at once; never wait long for it.
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        setsockopt(m.fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)?;
        Ok(m)
    }

    fn open(groups: u32, flags: libc::c_int) -> io::Result<Self> {
        let fd = socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | flags,
            libc::NETLINK_ROUTE,
        )?;
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = groups;
        // SAFETY: addr is a valid sockaddr_nl and its size is passed.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        })?;
        Ok(Self {
            fd,
            seq: 0,
            buf: vec![0; 64 << 10],
        })
    }

    /// The link messages waiting (empty when none). `ENOBUFS` means the
    /// kernel dropped some: the caller must look at every interface again.
    pub fn read(&mut self) -> io::Result<Vec<crate::driver::netlink::LinkEvent>> {
        let mut out = Vec::new();
        loop {
            match self.recv() {
                Ok(n) => out.extend(crate::driver::netlink::parse(&self.buf[..n])),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(out),
                Err(e) => return Err(e),
            }
        }
    }

    /// One datagram into the buffer; its length.
    fn recv(&mut self) -> io::Result<usize> {
        // SAFETY: buf is live and writable for its length.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                self.buf.as_mut_ptr().cast(),
                self.buf.len(),
                0,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// What the kernel says of interface `index` now (its name, kind and
    /// counters); `NotFound` when there is none.
    pub fn link(&mut self, index: u32) -> io::Result<crate::driver::netlink::LinkEvent> {
        self.seq = self.seq.wrapping_add(1);
        let req = crate::driver::netlink::get_link(index, self.seq);
        // SAFETY: req is live for its length; the kernel only reads it.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = self.recv()?;
        match crate::driver::netlink::parse(&self.buf[..n])
            .into_iter()
            .next()
        {
            Some(crate::driver::netlink::LinkEvent::Error(e)) => {
                Err(io::Error::from_raw_os_error(-e))
            }
            Some(e) => Ok(e),
            None => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }
}

impl AsRawFd for LinkMonitor {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Gathered write of `parts` to `fd` (one frame on a TAP or packet socket).
pub fn writev(fd: RawFd, parts: &[io::IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: IoSlice is ABI-compatible with iovec; the slices are live.
    let n = unsafe { libc::writev(fd, parts.as_ptr().cast(), parts.len() as libc::c_int) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Wait until one of `fds` is ready or `timeout` passes (to the
/// microsecond: `ppoll`); returns how many are ready (0 on timeout or
/// signal).
pub fn poll(fds: &mut [libc::pollfd], timeout: Duration) -> io::Result<usize> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: fds is a live slice of pollfd of the given length; ts lives
    // across the call; no signal mask is given (the current one stays).
    let n = unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            &ts,
            std::ptr::null(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(n as usize)
}

static TERMINATE: AtomicBool = AtomicBool::new(false);
static RELOAD: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    if sig == libc::SIGHUP {
        RELOAD.store(true, Ordering::SeqCst);
    } else {
        TERMINATE.store(true, Ordering::SeqCst);
    }
}

/// Catch SIGTERM and SIGINT (then [`terminate_requested`] is true) and
/// SIGHUP (then [`take_reload_request`] is true once); `poll` returns early.
pub fn catch_signals() -> io::Result<()> {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: sigaction is plain data; the handler only stores to
        // atomics, which is async-signal-safe. No SA_RESTART, so poll wakes.
        unsafe {
            let mut sa: libc::sigaction = mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            cvt(libc::sigaction(sig, &sa, std::ptr::null_mut()))?;
        }
    }
    Ok(())
}

pub fn terminate_requested() -> bool {
    TERMINATE.load(Ordering::SeqCst)
}

/// Whether SIGHUP arrived since the last call.
pub fn take_reload_request() -> bool {
    RELOAD.swap(false, Ordering::SeqCst)
}
