//! Real DHCP software for the snooping tests: dnsmasq as the server (what
//! libvirt's own networks run), busybox's udhcpc as a VM's client and its
//! udhcpd as a rogue server.

use std::path::PathBuf;
use std::time::Duration;

use crate::netns::{wait_for, Topo};

/// A VM's `udhcpc` script: the address it is given goes on its NIC.
const UDHCPC_SCRIPT: &str = "#!/bin/sh\ncase \"$1\" in\n  deconfig) ip -4 addr flush dev \"$interface\" ;;\n  bound|renew) ip -4 addr flush dev \"$interface\"; ip addr add \"$ip/$mask\" dev \"$interface\" ;;\nesac\n";

/// Start dnsmasq (process `label`) as the DHCP server on `eth0` of
/// namespace `ns`, leasing `range` (`first,last,mask,lease_s`), with
/// `extra` arguments (e.g. `--dhcp-host=MAC,IP`); returns once it serves.
///
/// # Panics
/// dnsmasq did not start within 10 s (its log is in the message).
pub fn dnsmasq(topo: &mut Topo, ns: &str, label: &str, range: &str, extra: &[&str]) {
    let leases = format!(
        "--dhcp-leasefile={}",
        topo.dir.join(format!("{label}.leases")).display()
    );
    let range = format!("--dhcp-range={range}");
    let mut args = vec![
        "dnsmasq",
        "--no-daemon",
        "--conf-file=/dev/null",
        "--port=0",
        "--interface=eth0",
        "--bind-interfaces",
        &range,
        &leases,
        "--log-dhcp",
        // (dnsmasq pings an address before it offers it, longer than
        // udhcpc waits between discovers.)
        "--no-ping",
    ];
    args.extend(extra);
    topo.spawn(ns, label, &args);
    assert!(
        wait_for(Duration::from_secs(10), || topo
            .log(label)
            .contains("DHCP, IP range")),
        "dnsmasq did not start: {}",
        topo.log(label)
    );
    std::thread::sleep(Duration::from_millis(200));
}

/// The udhcpc script, written to the topology's directory.
pub fn udhcpc_script(topo: &Topo) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = topo.dir.join("udhcpc.sh");
    std::fs::write(&path, UDHCPC_SCRIPT).expect("write the udhcpc script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
        .expect("make the udhcpc script executable");
    path
}

/// Take a lease on `eth0` of namespace `ns` with udhcpc (`extra`
/// arguments too); the address it put on the NIC.
///
/// # Panics
/// udhcpc got no lease (its output and the topology's logs are in the
/// message).
pub fn lease(topo: &Topo, ns: &str, extra: &str) -> String {
    let script = udhcpc_script(topo);
    let o = topo.try_sh(
        ns,
        &format!(
            "/bin/busybox udhcpc -i eth0 -q -n -t 5 -T 1 {extra} -s {}",
            script.display()
        ),
    );
    assert!(
        o.status.success(),
        "udhcpc: {}{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        topo.logs()
    );
    let shown = topo.sh(ns, "ip -4 -o addr show dev eth0");
    shown
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .unwrap_or_default()
        .to_string()
}
