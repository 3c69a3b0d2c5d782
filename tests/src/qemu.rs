//! Real QEMU guests for the end-to-end suite (TCG: this machine has no
//! usable KVM and no vhost-net): a Debian kernel and a busybox initramfs
//! (`tests/qemu/build-guest.sh`), a virtio-net NIC on a TAP made the way
//! libvirt makes it (`tests/qemu/tap-launch.py`: the TAP exists before
//! `start begin`, QEMU gets its fd and the TAP goes when QEMU exits), QMP
//! on a unix socket for migrations (`migrate`, `migrate-incoming`,
//! `migrate_cancel`, `cont`, `quit`), and libvirt's qemu hook called with
//! the domain XML libvirt would give at each step.
//!
//! Processes are the [`Topo`]'s: killed when it drops.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::netns::{dvs_bin, wait_for, Topo};

/// The guest's kernel and initramfs: `$DVS_GUEST_DIR`, or built into
/// `target/dvs-guest` (by `tests/qemu/build-guest.sh`, which scripts/test
/// runs first) from Debian packages.
pub fn guest_dir() -> PathBuf {
    let dir = std::env::var_os("DVS_GUEST_DIR").map_or_else(
        || workspace().join("target").join("dvs-guest"),
        PathBuf::from,
    );
    if !(dir.join("vmlinuz").exists() && dir.join("initramfs.gz").exists()) {
        let script = workspace().join("tests/qemu/build-guest.sh");
        let o = std::process::Command::new(&script)
            .arg(&dir)
            .output()
            .expect("run tests/qemu/build-guest.sh");
        assert!(
            o.status.success(),
            "building the QEMU guest failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    dir
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// A QEMU guest's identity.
#[derive(Debug, Clone)]
pub struct Guest {
    pub name: String,
    pub mac: String,
    /// Address with prefix (`10.40.0.5/24`).
    pub addr: String,
}

impl Guest {
    pub fn ip(&self) -> &str {
        self.addr.split('/').next().unwrap_or(&self.addr)
    }

    /// The domain XML libvirt hands its hook: an `<interface
    /// type='ethernet'>` with the guest's MAC, and its TAP's name once
    /// libvirt made it (`None` at `prepare begin` and `migrate begin` for a
    /// name libvirt generates).
    pub fn xml(&self, tap: Option<&str>) -> String {
        let target = tap.map_or_else(String::new, |t| format!("<target dev='{t}'/>"));
        format!(
            "<domain type='qemu'><name>{}</name><memory unit='KiB'>262144</memory><devices>\
             <interface type='ethernet'><mac address='{}'/>{target}<model type='virtio'/>\
             </interface></devices></domain>",
            self.name, self.mac
        )
    }
}

/// A QEMU process started on its TAP.
#[derive(Debug)]
pub struct Qemu {
    pub label: String,
    pub tap: String,
    qmp: PathBuf,
    go: PathBuf,
    pub console: PathBuf,
}

/// How a QEMU is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Boot the guest.
    Boot,
    /// Wait paused for an incoming migration (`-incoming defer -S`, as
    /// libvirt starts a migration's destination).
    Incoming,
}

impl Qemu {
    /// Make TAP `tap` in namespace `ns` and get QEMU ready to start on it;
    /// returns once the TAP exists (QEMU runs after [`Qemu::go`]).
    pub fn launch(
        topo: &mut Topo,
        ns: &str,
        label: &str,
        tap: &str,
        guest: &Guest,
        start: Start,
    ) -> Self {
        let dir = guest_dir();
        let qmp = topo.dir.join(format!("{label}.qmp"));
        let go = topo.dir.join(format!("{label}.go"));
        let console = topo.dir.join(format!("{label}.console"));
        let _ = std::fs::remove_file(&qmp);
        let _ = std::fs::remove_file(&go);
        let launcher = workspace().join("tests/qemu/tap-launch.py");
        let (kernel, initrd) = (dir.join("vmlinuz"), dir.join("initramfs.gz"));
        let append = format!("console=ttyS0 quiet panic=-1 dvs.ip={}", guest.addr);
        let netdev = "tap,id=n0,fd={fd},vhost=off".to_string();
        let nic = format!("virtio-net-pci,netdev=n0,mac={},romfile=", guest.mac);
        let qmp_arg = format!("unix:{},server=on,wait=off", qmp.display());
        let serial = format!("file:{}", console.display());
        let mut argv: Vec<String> = [
            "/usr/bin/python3",
            &launcher.to_string_lossy(),
            tap,
            &go.to_string_lossy(),
            "--",
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-m",
            "256",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            &kernel.to_string_lossy(),
            "-initrd",
            &initrd.to_string_lossy(),
            "-append",
            &append,
            "-netdev",
            &netdev,
            "-device",
            &nic,
            "-qmp",
            &qmp_arg,
            "-serial",
            &serial,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if start == Start::Incoming {
            argv.extend(["-incoming", "defer", "-S"].map(String::from));
        }
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        topo.spawn(ns, label, &argv);
        let ready = wait_for(Duration::from_secs(10), || {
            topo.log(label).contains("tap ready")
        });
        assert!(ready, "{label}: the TAP was not made:\n{}", topo.log(label));
        Qemu {
            label: label.to_string(),
            tap: tap.to_string(),
            qmp,
            go,
            console,
        }
    }

    /// Let QEMU start (libvirt execs it after `start begin`), and wait for
    /// its QMP socket.
    pub fn go(&self, topo: &Topo) {
        std::fs::write(&self.go, b"").expect("write the go file");
        let up = wait_for(Duration::from_secs(20), || self.qmp.exists());
        assert!(
            up,
            "{}: QEMU did not start:\n{}",
            self.label,
            topo.log(&self.label)
        );
    }

    /// Wait until the guest booted and its network is up.
    pub fn wait_booted(&self, topo: &Topo) {
        let up = wait_for(Duration::from_secs(60), || {
            std::fs::read_to_string(&self.console)
                .unwrap_or_default()
                .contains("dvs-guest: up")
        });
        assert!(
            up,
            "{}: the guest did not boot:\n{}\n{}",
            self.label,
            std::fs::read_to_string(&self.console).unwrap_or_default(),
            topo.log(&self.label)
        );
    }

    /// Run one QMP command; its `return` (an `error` panics, unless
    /// `tolerate` says the command may fail: then the error object).
    pub fn qmp(&self, execute: &str, arguments: Value) -> Value {
        self.qmp_checked(execute, arguments)
            .unwrap_or_else(|e| panic!("{}: QMP {execute}: {e}", self.label))
    }

    /// [`Qemu::qmp`] returning QMP's error instead of panicking on it.
    pub fn qmp_checked(&self, execute: &str, arguments: Value) -> Result<Value, Value> {
        let mut s = UnixStream::connect(&self.qmp)
            .map_err(|e| json!(format!("{}: QMP socket: {e}", self.label)))?;
        s.set_read_timeout(Some(Duration::from_secs(30))).ok();
        let mut r = BufReader::new(s.try_clone().expect("clone the QMP socket"));
        let mut line = String::new();
        r.read_line(&mut line)
            .map_err(|e| json!(format!("{}: QMP greeting: {e}", self.label)))?;
        let mut call = |cmd: Value| -> Result<Value, Value> {
            writeln!(s, "{cmd}").map_err(|e| json!(format!("QMP write: {e}")))?;
            loop {
                line.clear();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    return Err(json!("QMP closed"));
                }
                let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                if let Some(ret) = v.get("return") {
                    return Ok(ret.clone());
                }
                if let Some(e) = v.get("error") {
                    return Err(e.clone());
                }
            }
        };
        call(json!({"execute": "qmp_capabilities"}))?;
        let mut cmd = json!({ "execute": execute });
        if !arguments.is_null() {
            cmd["arguments"] = arguments;
        }
        call(cmd)
    }

    /// Migrate to the QEMU listening on `socket`; returns QEMU's
    /// `query-migrate` once it completed (status, downtime).
    pub fn migrate(&self, socket: &Path) -> Value {
        self.qmp(
            "migrate-set-parameters",
            json!({ "max-bandwidth": 4_000_000_000u64, "downtime-limit": 100 }),
        );
        self.qmp(
            "migrate",
            json!({ "uri": format!("unix:{}", socket.display()) }),
        );
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let q = self.qmp("query-migrate", Value::Null);
            match q["status"].as_str() {
                Some("completed") => return q,
                Some("failed" | "cancelled") => panic!("{}: migration {q}", self.label),
                _ if Instant::now() > end => panic!("{}: migration too slow: {q}", self.label),
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    /// Stop QEMU (libvirt kills it), and wait until its TAP is gone.
    pub fn quit(&self, topo: &mut Topo, ns: &str) {
        let _ = self.qmp_checked("quit", Value::Null);
        let gone = wait_for(Duration::from_secs(10), || !topo.running(&self.label));
        if !gone {
            topo.kill9(&self.label);
        }
        let tap_gone = wait_for(Duration::from_secs(5), || {
            !topo
                .try_sh(ns, &format!("ip link show {}", self.tap))
                .status
                .success()
        });
        assert!(tap_gone, "{}: the TAP outlived QEMU", self.label);
    }
}

/// Run `dvs hook libvirt` as libvirt would on `host` (its name in the
/// chassis) from namespace `ns`: `[domain, op, sub]` and `-`, `xml` on
/// stdin. Ok with stderr (the report) or Err with stderr; stdout must stay
/// empty (libvirt reads it as a new XML for `migrate` and `restore`).
pub fn hook(
    topo: &Topo,
    ns: &str,
    url: &str,
    host: &str,
    [domain, op, sub]: [&str; 3],
    xml: &str,
) -> Result<String, String> {
    let file = topo.dir.join(format!("{domain}-{op}-{sub}.xml"));
    std::fs::write(&file, xml).expect("write the domain XML");
    let bin = dvs_bin().to_string_lossy().into_owned();
    let o = topo.try_sh(
        ns,
        &format!(
            "{bin} --controller {url} hook libvirt --host {host} {domain} {op} {sub} - < {}",
            file.display()
        ),
    );
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        o.stdout.is_empty(),
        "libvirt would take the hook's stdout as a new XML: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    if o.status.success() {
        Ok(err)
    } else {
        Err(err)
    }
}

/// What `ping -D` saw: sent, received, and the longest time between two
/// replies in milliseconds.
pub fn ping_gaps(out: &str) -> (u32, u32, f64) {
    let (sent, received) = crate::netns::parse_ping(out);
    let times: Vec<f64> = out
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
        .collect();
    let gap = times
        .windows(2)
        .map(|w| (w[1] - w[0]) * 1000.0)
        .fold(0.0, f64::max);
    (sent, received, gap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_gaps_are_read_from_timestamps() {
        let out = "[1.000] 64 bytes from 10.0.0.1: icmp_seq=1 ttl=64 time=0.1 ms\n\
                   [1.010] 64 bytes from 10.0.0.1: icmp_seq=2 ttl=64 time=0.1 ms\n\
                   [1.250] 64 bytes from 10.0.0.1: icmp_seq=26 ttl=64 time=0.1 ms\n\
                   --- 10.0.0.1 ping statistics ---\n\
                   26 packets transmitted, 3 received, 88% packet loss, time 250ms\n";
        let (s, r, g) = ping_gaps(out);
        assert_eq!((s, r), (26, 3));
        assert!((g - 240.0).abs() < 0.01, "{g}");
    }
}
