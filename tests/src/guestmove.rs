//! Live migrations of a real QEMU guest as libvirt makes them, measured:
//! what the end-to-end suite (`tests/qemu.rs`) checks and the migration
//! benchmark (`benches/migration.rs`) reports. The same guest moves
//! between two hosts of a dvs chassis (the hook called in libvirt's order)
//! or between two TAPs on one Linux bridge (the reference); per move,
//! QEMU's downtime, the window the peer's pings are read in, and dvs's
//! timeline.

use std::time::Duration;

use serde_json::json;

use crate::chassis::Chassis;
use crate::netns::{wait_for, Topo};
use crate::qemu::{hook, Guest, Qemu, Start};

/// The libvirt hook on host `i` of the chassis, for guest `g`.
pub fn call(
    c: &Chassis,
    g: &Guest,
    i: usize,
    op: &str,
    sub: &str,
    tap: Option<&str>,
) -> Result<String, String> {
    hook(
        &c.topo,
        &c.core,
        &c.url(),
        &format!("h{}", i + 1),
        [&g.name, op, sub],
        &g.xml(tap),
    )
}

/// What the hook said, or a panic naming the step with the chassis's logs.
pub fn ok(r: Result<String, String>, what: &str, c: &Chassis) -> String {
    r.unwrap_or_else(|e| panic!("the hook's {what} failed: {e}\n{}", c.topo.logs()))
}

/// Start the guest on host `i` as libvirt does; returns its QEMU once the
/// guest's network is up.
pub fn start(c: &mut Chassis, g: &Guest, i: usize, label: &str, tap: &str) -> Qemu {
    let said = ok(call(c, g, i, "prepare", "begin", None), "prepare begin", c);
    assert!(said.contains("named at start"), "{said}");
    let ns = c.hosts[i].clone();
    let q = Qemu::launch(&mut c.topo, &ns, label, tap, g, Start::Boot);
    let said = ok(call(c, g, i, "start", "begin", Some(tap)), "start begin", c);
    assert!(said.contains(&format!("interface {tap}")), "{said}");
    q.go(&c.topo);
    ok(
        call(c, g, i, "started", "begin", Some(tap)),
        "started begin",
        c,
    );
    q.wait_booted(&c.topo);
    q
}

/// A TCP echo client in `ns`: a line every 10 ms to `ip:7` until `stop`
/// exists; prints {"sent", "echoed", "max_gap_ms", "error"} at the end.
pub fn echo_client(ip: &str, stop: &std::path::Path) -> String {
    format!(
        "import socket,time,json,os\n\
         s=socket.create_connection(('{ip}',7),5)\ns.settimeout(10)\n\
         sent=echoed=0;gap=0.0;last=time.time();err=None;buf=b''\n\
         while not os.path.exists('{stop}'):\n  \
           try:\n    s.sendall(b'x'*31+b'\\n');sent+=1\n    \
             while buf.count(b'\\n')<1:\n      d=s.recv(4096)\n      \
               if not d: raise OSError('closed')\n      buf+=d\n    \
             buf=buf[buf.index(b'\\n')+1:];echoed+=1\n    \
             now=time.time();gap=max(gap,now-last);last=now\n  \
           except OSError as e:\n    err=str(e);break\n  \
           time.sleep(0.01)\n\
         print(json.dumps({{'sent':sent,'echoed':echoed,'max_gap_ms':gap*1000,'error':err}}))\n",
        stop = stop.display()
    )
}

/// A listener on a VM's TAP: when each ICMP echo request went into the
/// VM and each reply came out, by the kernel's timestamps — what the
/// switch delivered, apart from how soon a TCG guest answers and from
/// the peer's pinger (iputils `ping` sends one request per 10 ms, its
/// `MININTERVAL`, while replies are outstanding: during a blackout).
#[derive(Debug)]
pub struct TapWatch {
    label: String,
}

/// The listener [`TapWatch`] runs (python: an AF_PACKET socket on the
/// TAP with `SO_TIMESTAMPNS`); prints `ready`, then `<time> req|rep`.
const TAP_WATCH: &str = r#"
import socket, struct, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((sys.argv[1], 0))
s.setsockopt(socket.SOL_SOCKET, 35, 1)
print("ready", flush=True)
while True:
    data, anc, _, _ = s.recvmsg(64, 64)
    if len(data) < 35 or data[12:14] != b"\x08\x00" or data[23] != 1:
        continue
    t = data[14 + (data[14] & 15) * 4]
    if t not in (0, 8):
        continue
    for level, kind, d in anc:
        if level == socket.SOL_SOCKET and kind == 35:
            sec, ns = struct.unpack("qq", d[:16])
            print(f"{sec + ns / 1e9:.6f} {'req' if t == 8 else 'rep'}", flush=True)
"#;

impl TapWatch {
    /// Listen on `tap` in namespace `ns` (process `label`).
    pub fn start(topo: &mut Topo, ns: &str, label: &str, tap: &str) -> TapWatch {
        topo.spawn(ns, label, &["/usr/bin/python3", "-c", TAP_WATCH, tap]);
        assert!(
            wait_for(Duration::from_secs(10), || topo
                .log(label)
                .starts_with("ready")),
            "the TAP listener did not start: {}",
            topo.log(label)
        );
        TapWatch {
            label: label.to_string(),
        }
    }

    /// Stop; when each request went in and each reply came out:
    /// `(time, true)` for a request to the VM, `(time, false)` for a reply.
    pub fn finish(self, topo: &mut Topo) -> Vec<(f64, bool)> {
        topo.stop(&self.label);
        topo.log(&self.label)
            .lines()
            .filter_map(|l| {
                let (t, kind) = l.split_once(' ')?;
                Some((t.parse().ok()?, kind == "req"))
            })
            .collect()
    }
}

/// `cont` returned (`resumed`) → the first request the switch put into the
/// VM's TAP and the first reply that came out of it, after the VM had
/// stopped at the source (`stopped`: a request before it was the
/// source's), in ms; NaN when none came.
pub fn tap_times(tap: &[(f64, bool)], stopped: f64, resumed: f64) -> (f64, f64) {
    let first = |req: bool| {
        tap.iter()
            .find(|(t, r)| *r == req && *t >= stopped)
            .map_or(f64::NAN, |(t, _)| (t - resumed) * 1e3)
    };
    (first(true), first(false))
}

/// What one migration looked like.
#[derive(Debug, Clone)]
pub struct Moved {
    pub announce: bool,
    /// QEMU's reported downtime (ms).
    pub downtime: f64,
    /// The wall-clock window of the move (s since the epoch).
    pub window: (f64, f64),
    /// When the destination's `cont` returned: the VM runs there.
    pub resumed: f64,
    /// dvs's timeline (the bridge reference has none).
    pub record: Option<serde_json::Value>,
    /// What the destination's TAP carried ([`TapWatch`]), when watched.
    pub tap: Vec<(f64, bool)>,
}

pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is past 1970")
        .as_secs_f64()
}

/// The destination QEMU listens for the incoming migration on `socket`
/// (a quiet guest: no announcements after it resumes).
pub fn listen(dst: &Qemu, socket: &std::path::Path, announce: bool) {
    if !announce {
        dst.qmp("migrate-set-parameters", json!({ "announce-rounds": 0 }));
    }
    dst.qmp(
        "migrate-incoming",
        json!({ "uri": format!("unix:{}", socket.display()) }),
    );
}

/// Migrate, then resume the destination as libvirt's Finish does; QEMU's
/// downtime (ms) and when the destination runs (s since the epoch).
pub fn migrate_and_resume(src: &Qemu, dst: &Qemu, socket: &std::path::Path) -> (f64, f64) {
    let q = src.migrate(socket);
    dst.qmp("cont", serde_json::Value::Null);
    let resumed = unix_now();
    (q["downtime"].as_f64().unwrap_or(f64::NAN), resumed)
}

/// Move the guest from host `from` to host `to` of the chassis as libvirt
/// does, the hook called at each of libvirt's steps.
#[allow(clippy::too_many_arguments)] // one move's every parameter, named
pub fn libvirt_move(
    c: &mut Chassis,
    g: &Guest,
    src: Qemu,
    from: usize,
    to: usize,
    n: usize,
    announce: bool,
    settle: Duration,
) -> (Qemu, Moved) {
    let tap = c.topo.name(&format!("m{n}"));
    // Destination: `migrate begin` (the XML without the TAP's name),
    // `prepare begin`, the TAP made, `start begin`, QEMU paused and
    // listening, `started begin`.
    let said = ok(call(c, g, to, "migrate", "begin", None), "migrate begin", c);
    assert!(said.contains("policy in place"), "{said}");
    ok(call(c, g, to, "prepare", "begin", None), "prepare begin", c);
    let ns = c.hosts[to].clone();
    let dst = Qemu::launch(
        &mut c.topo,
        &ns,
        &format!("qemu-m{n}"),
        &tap,
        g,
        Start::Incoming,
    );
    ok(
        call(c, g, to, "start", "begin", Some(&tap)),
        "start begin",
        c,
    );
    dst.go(&c.topo);
    let socket = c.topo.dir.join(format!("mig{n}.sock"));
    listen(&dst, &socket, announce);
    ok(
        call(c, g, to, "started", "begin", Some(&tap)),
        "started begin",
        c,
    );
    let id = c
        .migrations()
        .last()
        .and_then(|m| m["id"].as_u64())
        .expect("migrate begin made a migration");
    let watch = TapWatch::start(&mut c.topo, &ns, &format!("tapw{n}"), &tap);
    let t0 = unix_now();
    let (downtime, resumed) = migrate_and_resume(&src, &dst, &socket);
    // Source: libvirt's Confirm stops QEMU there.
    let src_ns = c.hosts[from].clone();
    let src_tap = src.tap.clone();
    src.quit(&mut c.topo, &src_ns);
    ok(
        call(c, g, from, "stopped", "end", Some(&src_tap)),
        "stopped end",
        c,
    );
    ok(call(c, g, from, "release", "end", None), "release end", c);
    let record = c.wait_phase(id, "done", Duration::from_secs(15));
    std::thread::sleep(settle);
    let t1 = unix_now();
    let tap = watch.finish(&mut c.topo);
    (
        dst,
        Moved {
            announce,
            downtime,
            window: (t0, t1),
            resumed,
            record: Some(record),
            tap,
        },
    )
}

/// Replies of `ping -D` as (time, icmp_seq).
pub fn replies(out: &str) -> Vec<(f64, u64)> {
    out.lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| {
            let ts = l.strip_prefix('[')?.split(']').next()?.parse().ok()?;
            let seq = l
                .split("icmp_seq=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some((ts, seq))
        })
        .collect()
}

/// Pings lost and the largest gap between replies (ms) within `window`.
pub fn window_loss(replies: &[(f64, u64)], window: (f64, f64)) -> (u64, f64) {
    let r: Vec<&(f64, u64)> = replies
        .iter()
        .filter(|(t, _)| *t >= window.0 && *t <= window.1)
        .collect();
    let (Some(first), Some(last)) = (r.first(), r.last()) else {
        return (u64::MAX, f64::INFINITY);
    };
    let lost = (last.1 - first.1 + 1).saturating_sub(r.len() as u64);
    let gap = r
        .windows(2)
        .map(|w| (w[1].0 - w[0].0) * 1000.0)
        .fold(0.0, f64::max);
    (lost, gap)
}

/// The median: the middle value, or the mean of the two middle ones.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Migrations of guest `g` between TAPs on one Linux bridge under a ping
/// every `interval` seconds from a peer on the bridge (`moves`: with QEMU's
/// announcements or without, each): the reference. Each move's window and
/// the replies the peer got.
pub fn bridge_reference(
    g: &Guest,
    moves: &[bool],
    interval: &str,
) -> Vec<(Moved, Vec<(f64, u64)>)> {
    let mut topo = Topo::new();
    let br = topo.add_ns("br");
    let p = topo.add_ns("pb");
    let (a, b) = (topo.name("ba"), topo.name("bb"));
    topo.sh(
        "",
        &format!("ip link add {a} netns {br} type veth peer name {b} netns {p}"),
    );
    topo.sh(
        &br,
        &format!(
            "ip link add br0 type bridge && ip link set br0 up && ip link set {a} master br0 up"
        ),
    );
    topo.sh(&p, &format!("ip link set {b} name eth0 && ip addr add 10.40.0.100/24 dev eth0 && ip link set eth0 up"));
    let tap = |topo: &Topo, n: usize| topo.name(&format!("r{n}"));
    let t0 = tap(&topo, 0);
    let mut q = Qemu::launch(&mut topo, &br, "bq0", &t0, g, Start::Boot);
    topo.sh(&br, &format!("ip link set {t0} master br0"));
    q.go(&topo);
    q.wait_booted(&topo);
    assert!(wait_for(Duration::from_secs(15), || topo
        .try_sh(&p, &format!("ping -c 1 -W 1 {}", g.ip()))
        .status
        .success()));
    let mut out = Vec::new();
    for (n, announce) in moves.iter().copied().enumerate() {
        topo.spawn(
            &p,
            &format!("bping{n}"),
            &["ping", "-D", "-i", interval, g.ip()],
        );
        std::thread::sleep(Duration::from_secs(1));
        let t = tap(&topo, n + 1);
        let dst = Qemu::launch(
            &mut topo,
            &br,
            &format!("bq{}", n + 1),
            &t,
            g,
            Start::Incoming,
        );
        topo.sh(&br, &format!("ip link set {t} master br0"));
        dst.go(&topo);
        let socket = topo.dir.join(format!("bmig{n}.sock"));
        listen(&dst, &socket, announce);
        let watch = TapWatch::start(&mut topo, &br, &format!("btapw{n}"), &t);
        let w0 = unix_now();
        let (downtime, resumed) = migrate_and_resume(&q, &dst, &socket);
        q.quit(&mut topo, &br);
        std::thread::sleep(Duration::from_millis(1500));
        let w1 = unix_now();
        let tap = watch.finish(&mut topo);
        topo.signal(&format!("bping{n}"), "INT");
        assert!(wait_for(Duration::from_secs(5), || !topo
            .running(&format!("bping{n}"))));
        let rep = replies(&topo.log(&format!("bping{n}")));
        out.push((
            Moved {
                announce,
                downtime,
                window: (w0, w1),
                resumed,
                record: None,
                tap,
            },
            rep,
        ));
        q = dst;
    }
    q.quit(&mut topo, &br);
    out
}
