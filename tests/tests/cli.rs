//! The `dvs` binary as users meet it: exit codes and the one-line errors of
//! bad input. No root needed.

#![allow(clippy::unwrap_used)] // a test fails on the spot, saying where

use std::process::Command;

use dvs_tests::netns::dvs_bin;

fn dvs(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(dvs_bin())
        .args(args)
        .output()
        .expect("run dvs");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn agent_with(yaml: &str) -> (i32, String) {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("dvs-cli-{}-{n}.yaml", std::process::id()));
    std::fs::write(&path, yaml).unwrap();
    let (code, _, err) = dvs(&["agent", "--config", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    (code, err)
}

#[test]
fn agent_rejects_bad_files_with_one_line_that_names_the_problem() {
    let cases = [
        (
            "host: h\nports:\n  - { id: 1, name: a, tap: t1, vlan: { mode: access, id: 5000 } }\n",
            "VLAN 5000 is out of range 1..=4094",
        ),
        (
            "host: h\nports:\n  - { id: 1, name: a, tap: t1, vlan: { mode: access, id: 0 } }\n",
            "VLAN 0 is out of range 1..=4094",
        ),
        (
            "host: h\nports:\n  - { id: 1, name: a, tap: t1, vlan: { mode: trunk, allowed: [10, 4095] } }\n",
            "VLAN 4095 is out of range 1..=4094",
        ),
        (
            "host: h\nports:\n  - { id: 1, name: a, tap: t1, vlan: { mode: access, id: 10 } }\nstatic_macs:\n  - { vlan: 10, mac: \"02:00:00:00:00:01\", port: ghost }\n",
            "unknown port `ghost`; ports in this file: a",
        ),
        ("host: h\nbogus: 1\n", "unknown field `bogus`"),
        (
            "host: h\nmonitors:\n  - { name: m, version: 7, collectors: [\"127.0.0.1:2055\"] }\n",
            "monitor `m`, version: `7` is not an export format dvs speaks: expected v5, v9 or ipfix",
        ),
        (
            "host: h\nmonitors:\n  - { name: m, version: ipfix, collectors: [\"127.0.0.1\"] }\n",
            "monitor `m`, collectors[0]: `127.0.0.1` is not a collector address: expected IP:PORT",
        ),
        (
            "host: h\nmonitors:\n  - { name: m, version: v9, collectors: [\"127.0.0.1:2055\"], active_timeout_s: 0 }\n",
            "monitor `m`, active_timeout_s: 0 is not valid: use 1..=86400 seconds",
        ),
        (
            "host: h\nmonitors:\n  - { name: m, version: v9, collectors: [\"127.0.0.1:2055\"], inactive_timeout_s: 0 }\n",
            "monitor `m`, inactive_timeout_s: 0 is not valid",
        ),
    ];
    for (yaml, want) in cases {
        let (code, err) = agent_with(yaml);
        assert_eq!(code, 1, "{err}");
        assert!(err.starts_with("dvs: config file "), "{err}");
        assert!(err.contains(want), "expected `{want}` in: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    }
}

#[test]
fn agent_names_a_missing_file() {
    let (code, _, err) = dvs(&["agent", "--config", "/nonexistent/dvs.yaml"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("reading config file /nonexistent/dvs.yaml"),
        "{err}"
    );
    assert!(err.contains("No such file"), "{err}");
}

#[test]
fn lab_runs_and_reports_json() {
    let (code, out, err) = dvs(&["lab", "--json"]);
    assert_eq!(code, 0, "{err}\n{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    assert_eq!(v["hosts"].as_array().unwrap().len(), 2);
    assert!(v["tcp"]["ok"].as_bool().unwrap());
    assert!(v["pings"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["ok"] == true));
}

#[test]
fn unknown_commands_fail_with_usage() {
    let (code, _, err) = dvs(&["frobnicate"]);
    assert_eq!(code, 2);
    assert!(err.contains("unrecognized subcommand"), "{err}");
}

/// The agent files users copy from the README and from `dvs agent --help`
/// are valid.
#[test]
fn documented_agent_files_parse() {
    let readme = include_str!("../../README.md");
    let start = readme
        .find("```yaml\n# h1.yaml")
        .expect("README has the h1.yaml example")
        + 8;
    let len = readme[start..].find("```").expect("the example block ends");
    dvs_switch::agent::config::AgentConfig::parse(&readme[start..start + len])
        .unwrap_or_else(|e| panic!("README's agent file: {e}"));

    let (code, help, _) = dvs(&["agent", "--help"]);
    assert_eq!(code, 0);
    let start = help.find("host: h1").expect("the help shows an agent file");
    let len = help[start..]
        .find("\n\n")
        .expect("the example ends with a blank line");
    dvs_switch::agent::config::AgentConfig::parse(&help[start..start + len])
        .unwrap_or_else(|e| panic!("the help's agent file: {e}"));
}

/// A `dvs controller` on a free loopback port with a fresh store; killed
/// and its store removed on drop.
struct Controller {
    child: std::process::Child,
    url: String,
    dir: std::path::PathBuf,
}

impl Controller {
    fn start() -> Self {
        Self::start_with(None)
    }

    /// With `token`, the controller requires it on admin calls.
    fn start_with(token: Option<&str>) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("dvs-cli-ctl-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut cmd = Command::new(dvs_bin());
        cmd.args([
            "controller",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(dir.join("store"));
        if let Some(t) = token {
            let f = dir.join("token");
            std::fs::write(&f, format!("{t}\n")).unwrap();
            cmd.arg("--admin-token-file").arg(f);
        }
        let child = cmd.spawn().expect("start the controller");
        let url = format!("http://127.0.0.1:{port}");
        let t = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t.elapsed().as_secs() < 10, "the controller did not listen");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Controller { child, url, dir }
    }

    fn dvs(&self, args: &[&str]) -> (i32, String, String) {
        let mut a = vec!["--controller", &self.url];
        a.extend_from_slice(args);
        dvs(&a)
    }

    fn apply(&self, yaml: &str) -> (i32, String, String) {
        let f = self.dir.join("apply.yaml");
        std::fs::write(&f, yaml).unwrap();
        self.dvs(&["profile", "apply", "-f", f.to_str().unwrap()])
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn rejected_applies_and_deletes_say_why_in_one_line_and_change_nothing() {
    let c = Controller::start();
    let (code, out, err) = c.apply(
        "kind: PortProfile\nname: base\nvlan: { mode: access, id: 10 }\n---\nkind: PortProfile\nname: web\ninherit: base\n",
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("profile web: created (version 1)"), "{out}");
    let cases = [
        (
            "kind: PortProfile\nname: web\ninherit: base\nacl: { in: [ { action: permit, proto: tcp, dst_port: 70000 } ] }\n",
            "dvs: profile `web`, acl.in[0], dst_port: port 70000 is out of range 0..=65535",
        ),
        (
            "kind: PortProfile\nname: app\ninherit: nosuch\n",
            "dvs: profile `app`, inherit: unknown profile `nosuch`; profiles here: app, base, web",
        ),
        (
            "kind: PortProfile\nname: base\ninherit: web\nvlan: { mode: access, id: 10 }\n",
            "dvs: profile `base`, inherit: profiles inherit in a cycle: base → web → base",
        ),
        (
            "kind: PortProfile\nname: x\nvlan: { mode: access, id: 10 }\n---\nkind: Profile\nname: y\n",
            "dvs: document 2: kind `Profile` is not one this file may hold: expected PortProfile, NetflowMonitor or PrivateVlan",
        ),
    ];
    for (yaml, want) in cases {
        let (code, _, err) = c.apply(yaml);
        assert_eq!(code, 1, "{yaml}");
        assert_eq!(err.trim_end(), want);
    }
    let (code, out, _) = c.dvs(&[
        "port",
        "create",
        "--vm",
        "vm1",
        "--mac",
        "02:00:00:00:00:01",
        "--profile",
        "web",
    ]);
    assert_eq!((code, out.trim()), (0, "veth1"));
    let (code, _, err) = c.dvs(&["profile", "delete", "web"]);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim_end(),
        "dvs: profile `web` is in use by port veth1: give them another profile first"
    );
    let (code, _, err) = c.dvs(&[
        "port",
        "create",
        "--vm",
        "vm2",
        "--mac",
        "02:00:00:00:00:01",
        "--profile",
        "web",
    ]);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim_end(),
        "dvs: MAC 02:00:00:00:00:01 belongs to port veth1 (VM `vm1`)"
    );
    // Nothing changed: still the first versions and one port.
    let (_, out, _) = c.dvs(&["--output", "json", "profile", "list"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        v.as_array().unwrap().iter().all(|p| p["version"] == 1),
        "{v}"
    );
    let (_, out, _) = c.dvs(&["--output", "json", "port", "list"]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // A dry run prints the change and applies nothing.
    let (code, out, _) =
        c.apply("kind: PortProfile\nname: web\ninherit: base\nqos: { in: { avg_mbps: 10 } }\n");
    assert_eq!(code, 0);
    assert!(out.contains("profile web: version 1 → 2 (qos)"), "{out}");
}

#[test]
fn admin_commands_name_an_unreachable_controller() {
    let (code, _, err) = dvs(&["--controller", "http://127.0.0.1:1", "port", "list"]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("dvs: cannot reach the controller at http://127.0.0.1:1"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn a_controller_with_a_token_refuses_admin_calls_without_it() {
    let c = Controller::start_with(Some("s3cret-s3cret-s3cret"));
    let (code, _, err) = c.dvs(&["port", "list"]);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim_end(),
        "dvs: admin calls need the controller's token: pass --token or set DVS_TOKEN"
    );
    let (code, _, err) = c.dvs(&["--token", "guess-guess-guess-guess", "port", "list"]);
    assert_eq!((code, err.trim_end()), (1, "dvs: the admin token is wrong"));
    let (code, out, err) = c.dvs(&["--token", "s3cret-s3cret-s3cret", "port", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("INTERFACE"), "{out}");
}

/// `dvs ARGS` with `input` on stdin.
fn dvs_stdin(args: &[&str], input: &str) -> (i32, String, String) {
    use std::io::Write;
    let mut child = Command::new(dvs_bin())
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run dvs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

const DOMAIN: &str = "<domain type='kvm'><name>web1</name><devices>\
    <interface type='ethernet'><mac address='02:00:00:00:00:07'/><target dev='vnet7'/></interface>\
    </devices></domain>";

#[test]
fn the_libvirt_hook_refuses_bad_input_before_anything_changes() {
    // No controller is needed to refuse these (none listens on port 1).
    let hook = |op: &str, sub: &str, domain: &str, xml: &str| {
        dvs_stdin(
            &[
                "--controller",
                "http://127.0.0.1:1",
                "hook",
                "libvirt",
                "--host",
                "h2",
                domain,
                op,
                sub,
                "-",
            ],
            xml,
        )
    };
    let (code, out, err) = hook(
        "migrate",
        "begin",
        "web1",
        "<domain><name>web1</name><devices>",
    );
    assert_eq!(code, 1);
    assert!(
        out.is_empty(),
        "libvirt would read stdout as the new XML: {out}"
    );
    assert!(
        err.starts_with("dvs: the domain XML is malformed: "),
        "{err}"
    );
    let (code, _, err) = hook("explode", "begin", "web1", DOMAIN);
    assert_eq!(code, 1);
    assert!(err.contains("unknown operation `explode`"), "{err}");
    let (code, _, err) = hook("migrate", "begin", "db1", DOMAIN);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim_end(),
        "dvs: the hook is called for domain `db1` but the XML is of `web1`"
    );
    let bad_mac = DOMAIN.replace("02:00:00:00:00:07", "02:00:00:00:00");
    let (code, _, err) = hook("migrate", "begin", "web1", &bad_mac);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("dvs: interface 0 of the domain XML: <mac address='02:00:00:00:00'>"),
        "{err}"
    );
    // Operations that do not concern the network need no controller.
    let (code, _, err) = hook("started", "begin", "web1", DOMAIN);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn migrations_of_unknown_ports_and_hosts_are_refused() {
    let c = Controller::start();
    let (code, _, err) = c.dvs(&["migrate", "start", "--port", "veth1", "--to", "h2"]);
    assert_eq!(code, 1);
    assert_eq!(err.trim_end(), "dvs: no port veth1");
    let (code, _, _) = c.apply("kind: PortProfile\nname: web\nvlan: { mode: access, id: 10 }\n");
    assert_eq!(code, 0);
    let (code, _, err) = c.dvs(&[
        "port",
        "create",
        "--vm",
        "vm1",
        "--mac",
        "02:00:00:00:00:07",
        "--profile",
        "web",
        "--host",
        "h1",
        "--tap",
        "t1",
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = c.dvs(&["migrate", "start", "--port", "veth1", "--to", "h9"]);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim_end(),
        "dvs: unknown host `h9`: no host's agent has registered yet"
    );
    let (code, _, err) = c.dvs(&["migrate", "abort", "--id", "4"]);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim_end(),
        "dvs: no migration 4: `dvs migrate list` shows them"
    );
    // The hook finds no port for a MAC it does not know.
    let xml = DOMAIN.replace("02:00:00:00:00:07", "02:00:00:00:00:08");
    let (code, _, err) = dvs_stdin(
        &[
            "--controller",
            &c.url,
            "hook",
            "libvirt",
            "--host",
            "h2",
            "web1",
            "migrate",
            "begin",
            "-",
        ],
        &xml,
    );
    assert_eq!(code, 1);
    assert_eq!(
        err.trim_end(),
        "dvs: no port has MAC 02:00:00:00:00:08 (domain web1): create it with `dvs port create --mac 02:00:00:00:00:08`"
    );
    let (code, out, _) = c.dvs(&["migrate", "list"]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 1, "only the header: {out}");
}
