//! Migrations through the controller over real gRPC (loopback), with
//! simulated agents speaking the agent protocol: a migration runs from
//! begin to the binding's move; bad requests and a corrupted snapshot are
//! refused with the reason and leave the source in charge; a restarted
//! controller aborts what had not switched over and finishes what had.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use dvs_controller::server::{serve_on, Controller};
use dvs_migrate::snapshot::Kind as SnapKind;
use dvs_proto::api::{
    self, admin_client::AdminClient, agent_client::AgentClient, agent_message,
    controller_message::Msg, migration_command::Op, migration_event::Kind,
};
use dvs_proto::PortId;
use dvs_switch::agent::migration::{Handover, Inbound, Inbox, Snapshot, Transfer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

type Admin = AdminClient<tonic::transport::Channel>;

/// A controller on a loopback port; dropped, it stops.
struct Running {
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    async fn start(dir: &std::path::Path) -> Running {
        Self::start_with(dir, |c| c).await
    }

    async fn start_with(
        dir: &std::path::Path,
        options: impl FnOnce(Controller) -> Controller,
    ) -> Running {
        // A controller that just stopped may still hold the store briefly.
        let mut controller = None;
        for _ in 0..50 {
            match Controller::open(dir) {
                Ok(c) => {
                    controller = Some(c);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let controller = options(controller.expect("the store opens"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let done = tokio::spawn(async move {
            let _ = serve_on(controller, listener, None, async {
                let _ = stopped.await;
            })
            .await;
        });
        Running {
            url,
            stop: Some(stop),
            done: Some(done),
        }
    }

    /// Tell the server to stop (sessions that end now are not hosts
    /// leaving: as after a crash, migrations stay as they are).
    async fn halt(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    async fn stop(mut self) {
        self.halt().await;
        if let Some(d) = self.done.take() {
            // Sessions still open would hold a graceful stop.
            if tokio::time::timeout(Duration::from_secs(3), d)
                .await
                .is_err()
            {
                panic!("the controller did not stop: a session is still open");
            }
        }
    }

    async fn admin(&self) -> Admin {
        AdminClient::connect(self.url.clone()).await.unwrap()
    }
}

fn temp(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("dvs-mig-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A simulated agent: its session, and the items it was given.
struct Agent {
    host: String,
    tx: mpsc::Sender<api::AgentMessage>,
    rx: tonic::Streaming<api::ControllerMessage>,
    items: std::collections::BTreeMap<String, serde_json::Value>,
    revision: u64,
    commands: Vec<api::MigrationCommand>,
    /// Told before the next full state is acknowledged.
    telling: Vec<api::MigrationEvent>,
}

impl Agent {
    async fn connect(url: &str, host: &str, ip: &str) -> Agent {
        Self::connect_telling(url, host, ip, Vec::new()).await
    }

    /// Connect, and tell `events` before acknowledging the first state
    /// (as an agent that reconnects says what its ports do).
    async fn connect_telling(
        url: &str,
        host: &str,
        ip: &str,
        events: Vec<api::MigrationEvent>,
    ) -> Agent {
        let mut c = AgentClient::connect(url.to_string()).await.unwrap();
        let (tx, rx) = mpsc::channel(64);
        tx.send(api::AgentMessage {
            msg: Some(agent_message::Msg::Register(api::Register {
                host: host.into(),
                tunnel_ip: ip.into(),
                revision: 0,
            })),
        })
        .await
        .unwrap();
        let rx = c
            .session(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let mut a = Agent {
            host: host.into(),
            tx,
            rx,
            items: Default::default(),
            revision: 0,
            commands: Vec::new(),
            telling: events,
        };
        a.next().await;
        a
    }

    /// Take the next message (state or command); acks states.
    async fn next(&mut self) {
        let m = tokio::time::timeout(Duration::from_secs(5), self.rx.message())
            .await
            .unwrap_or_else(|_| panic!("{}: nothing from the controller", self.host))
            .unwrap()
            .unwrap();
        match m.msg.unwrap() {
            Msg::Full(f) => {
                self.items = f
                    .items
                    .into_iter()
                    .map(|i| (i.key, serde_json::from_str(&i.json).unwrap()))
                    .collect();
                for e in std::mem::take(&mut self.telling) {
                    self.event(e).await;
                }
                self.ack(f.revision).await;
            }
            Msg::Delta(d) => {
                for i in d.upsert {
                    self.items
                        .insert(i.key, serde_json::from_str(&i.json).unwrap());
                }
                for k in d.remove {
                    self.items.remove(&k);
                }
                self.ack(d.revision).await;
            }
            Msg::Migration(c) => self.commands.push(c),
        }
    }

    async fn ack(&mut self, revision: u64) {
        self.revision = revision;
        self.send(agent_message::Msg::Ack(api::Ack { revision }))
            .await;
    }

    async fn send(&self, m: agent_message::Msg) {
        self.tx
            .send(api::AgentMessage { msg: Some(m) })
            .await
            .unwrap();
    }

    async fn event(&self, e: api::MigrationEvent) {
        self.send(agent_message::Msg::Migration(e)).await;
    }

    /// Read until a command `op` came; returns it.
    async fn command(&mut self, op: Op) -> api::MigrationCommand {
        loop {
            if let Some(i) = self.commands.iter().position(|c| c.op == op as i32) {
                return self.commands.remove(i);
            }
            self.next().await;
        }
    }

    /// Read until `f` holds of the items.
    async fn until(&mut self, f: impl Fn(&Self) -> bool) {
        while !f(self) {
            self.next().await;
        }
    }
}

fn event(m: u64, port: &str, kind: Kind) -> api::MigrationEvent {
    api::MigrationEvent {
        migration: m,
        port: port.into(),
        kind: kind as i32,
        ..Default::default()
    }
}

async fn setup(r: &Running) -> (Admin, Agent, Agent) {
    common::seed(&r.url).await;
    let admin = r.admin().await;
    let h1 = Agent::connect(&r.url, "h1", "10.0.0.1").await;
    let h2 = Agent::connect(&r.url, "h2", "10.0.0.2").await;
    (admin, h1, h2)
}

async fn list(admin: &mut Admin) -> Vec<api::Migration> {
    admin
        .list_migrations(api::Empty {})
        .await
        .unwrap()
        .into_inner()
        .migrations
}

async fn start(admin: &mut Admin) -> api::Migration {
    admin
        .start_migration(api::StartMigrationRequest {
            port: "veth1".into(),
            to: "h2".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// The port's snapshot as the source sends it, in chunks of `chunk` bytes.
fn snapshot(migration: u64, conns: u32) -> Vec<u8> {
    Snapshot {
        port: PortId::new(1).unwrap(),
        migration,
        seq: 0,
        kind: SnapKind::Full,
        state: Transfer {
            state: dvs_switch::tracked_port_state(conns),
            gone: Vec::new(),
            since_base: Duration::ZERO,
        },
    }
    .encode()
    .unwrap()
}

/// The source's STOPPED events: the snapshot in chunks, with what it holds.
async fn send_stopped(h1: &Agent, m: u64, bytes: &[u8], chunk: usize, conns: u64) {
    let mut parts = bytes.chunks(chunk).peekable();
    while let Some(p) = parts.next() {
        h1.event(api::MigrationEvent {
            at_us: 1,
            connections: conns,
            chunk: p.to_vec(),
            more: parts.peek().is_some(),
            ..event(m, "veth1", Kind::Stopped)
        })
        .await;
    }
}

/// Prepare migration `m` on h2 (it gets the port in standby and acks).
async fn prepare(h2: &mut Agent, m: u64) {
    h2.until(|a| {
        a.items
            .get("port/veth1")
            .is_some_and(|p| p["standby"] == true && p["migration"] == m)
    })
    .await;
}

async fn phase(admin: &mut Admin, m: u64, want: &str) -> api::Migration {
    for _ in 0..200 {
        let x = list(admin).await.into_iter().find(|x| x.id == m).unwrap();
        if x.phase().name() == want {
            return x;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("migration {m} never {want}: {:?}", list(admin).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_moves_the_port_with_its_state() {
    let dir = temp("run");
    let mut r = Running::start(&dir).await;
    let (mut admin, mut h1, mut h2) = setup(&r).await;
    let m = start(&mut admin).await;
    assert_eq!(
        (m.phase().name(), m.from.as_str(), m.to.as_str()),
        ("preparing", "h1", "h2")
    );
    prepare(&mut h2, m.id).await;
    phase(&mut admin, m.id, "syncing").await;
    // The pre-copy: h1 sends its state while it forwards; h2 gets it.
    h1.command(Op::Sync).await;
    let port = PortId::new(1).unwrap();
    let state = dvs_switch::tracked_port_state(100);
    for e in dvs_switch::agent::migration::synced_events(m.id, port, state.clone()).unwrap() {
        h1.event(e).await;
    }
    let mut inbox = Inbox::default();
    let pre = h2.command(Op::Presync).await;
    assert!(matches!(inbox.take(&pre, port), Inbound::Based));
    // h2 sees the VM's first frame: h1 is told to stop, redirecting to h2,
    // and hands over what changed since (here: nothing but the counters).
    h2.event(event(m.id, "veth1", Kind::Wakeup)).await;
    let stop = h1.command(Op::Stop).await;
    assert_eq!(
        (stop.port.as_str(), stop.redirect.as_str()),
        ("veth1", "10.0.0.2")
    );
    // A second on, no connection saw a packet: the delta holds none.
    let later = dvs_switch::PortState {
        conntrack: Vec::new(),
        ..state.clone()
    };
    let h = Handover {
        transfer: dvs_switch::agent::migration::Transfer {
            state: later,
            gone: Vec::new(),
            since_base: Duration::from_secs(1),
        },
        delta: true,
        connections: 100,
        last_from_vm: Some(Duration::from_micros(1)),
        last_to_vm: None,
    };
    let stopped = dvs_switch::agent::migration::stopped_events(m.id, port, h).unwrap();
    let bytes: Vec<u8> = stopped.iter().flat_map(|e| e.chunk.clone()).collect();
    for e in stopped {
        h1.event(e).await;
    }
    let start = loop {
        let c = h2.command(Op::Start).await;
        match inbox.take(&c, port) {
            Inbound::More => continue,
            Inbound::Start(s) => break s,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(start.conntrack.len(), 100, "the delta on its base");
    h2.event(api::MigrationEvent {
        dropped: 3,
        ..event(m.id, "veth1", Kind::Started)
    })
    .await;
    let done = phase(&mut admin, m.id, "done").await;
    assert_eq!(done.trigger().name(), "first_frame");
    assert_eq!(done.connections, 100);
    assert_eq!(done.dropped_frames, 3);
    assert_eq!(done.snapshot_bytes, bytes.len() as u64);
    assert!(
        done.base_snapshot_bytes > 10 * done.snapshot_bytes,
        "the handover is a small delta: {done:?}"
    );
    assert!(done.policy_ready_us >= done.begin_us && done.switchover_us >= done.policy_ready_us);
    assert_eq!(done.last_frame_source_us, 1);
    // The binding moved: h2 runs the port (no standby), h1 has it no more.
    h2.until(|a| {
        a.items
            .get("port/veth1")
            .is_some_and(|p| p.get("standby").is_none())
    })
    .await;
    h1.until(|a| !a.items.contains_key("port/veth1")).await;
    let p = admin
        .get_port(api::PortRef { id: "veth1".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.host, "h2");
    // The destination's first forwarded frame completes the timeline.
    h2.event(api::MigrationEvent {
        at_us: done.done_us + 500,
        ..event(m.id, "", Kind::FirstForwarded)
    })
    .await;
    let mut t = done.clone();
    for _ in 0..100 {
        t = list(&mut admin).await.pop().unwrap();
        if t.first_frame_destination_us != 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(t.first_frame_destination_us, done.done_us + 500);
    r.halt().await;
    drop((h1, h2));
    r.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_migrations_are_refused_and_change_nothing() {
    let dir = temp("bad");
    let mut r = Running::start(&dir).await;
    let (mut admin, h1, h2) = setup(&r).await;
    admin
        .create_port(api::CreatePortRequest {
            vm: "vm2".into(),
            mac: "02:00:00:00:00:02".into(),
            profile: "web".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let revision = || async {
        AdminClient::connect(r.url.clone())
            .await
            .unwrap()
            .show_chassis(api::Empty {})
            .await
            .unwrap()
            .into_inner()
            .revision
    };
    let before = revision().await;
    let refuse = |port: &str, to: &str| {
        let a = r.admin();
        let (port, to) = (port.to_string(), to.to_string());
        async move {
            a.await
                .start_migration(api::StartMigrationRequest {
                    port,
                    to,
                    ..Default::default()
                })
                .await
                .unwrap_err()
        }
    };
    let e = refuse("veth9", "h2").await;
    assert_eq!((e.code(), e.message()), (Code::NotFound, "no port veth9"));
    let e = refuse("port1", "h2").await;
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    let e = refuse("veth1", "h9").await;
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::NotFound,
            "unknown host `h9`: hosts whose agent registered are h1, h2"
        )
    );
    let e = refuse("veth1", "h1").await;
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::InvalidArgument,
            "port veth1 is on host h1 already: migrate it to another host"
        )
    );
    let e = refuse("veth2", "h2").await;
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().starts_with("port veth2 is not bound to a host"),
        "{}",
        e.message()
    );
    for (id, port) in [(99, ""), (0, "veth1"), (0, "")] {
        let e = admin
            .abort_migration(api::MigrationRef {
                id,
                port: port.into(),
                reason: String::new(),
            })
            .await
            .unwrap_err();
        let want = match (id, port) {
            (99, _) => "no migration 99: `dvs migrate list` shows them",
            (_, "veth1") => "port veth1 is not migrating",
            _ => "name the migration (--id) or its port (--port)",
        };
        assert_eq!(e.message(), want);
    }
    assert_eq!(revision().await, before, "nothing changed");
    assert!(list(&mut admin).await.is_empty());

    // A second migration of a port already migrating: to the same host it
    // is the same migration (a VMM's hook may ask again), elsewhere refused.
    let m = start(&mut admin).await;
    assert_eq!(start(&mut admin).await.id, m.id);
    let e = refuse("veth1", "h1").await;
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().starts_with(&format!(
            "port veth1 is migrating already (migration {} to h2, ",
            m.id
        )),
        "{}",
        e.message()
    );
    // Nor can the port be deleted or rebound meanwhile.
    let e = admin
        .delete_port(api::PortRef { id: "veth1".into() })
        .await
        .unwrap_err();
    assert!(e.message().contains("is migrating"), "{}", e.message());
    assert_eq!(list(&mut admin).await.len(), 1);
    r.halt().await;
    drop((admin, h1, h2));
    r.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_snapshot_aborts_and_the_source_resumes() {
    let dir = temp("crc");
    let mut r = Running::start(&dir).await;
    let (mut admin, mut h1, mut h2) = setup(&r).await;
    let m = start(&mut admin).await;
    prepare(&mut h2, m.id).await;
    admin
        .activate_migration(api::MigrationRef {
            id: m.id,
            ..Default::default()
        })
        .await
        .unwrap();
    h1.command(Op::Stop).await;
    let mut bytes = snapshot(m.id, 10);
    let n = bytes.len();
    bytes[n - 7] ^= 0x20;
    send_stopped(&h1, m.id, &bytes, 1 << 20, 10).await;
    let x = phase(&mut admin, m.id, "aborted").await;
    assert!(
        x.abort_reason
            .starts_with("the source's snapshot: snapshot corrupted: CRC-32"),
        "{}",
        x.abort_reason
    );
    // The source forwards again; the destination loses its copy; nothing
    // started there.
    let resume = h1.command(Op::Resume).await;
    assert_eq!(resume.migration, m.id);
    h2.until(|a| !a.items.contains_key("port/veth1")).await;
    assert!(h2.commands.iter().all(|c| c.op != Op::Start as i32));
    // A truncated one, the same.
    let m = start(&mut admin).await;
    prepare(&mut h2, m.id).await;
    h2.event(event(m.id, "veth1", Kind::Wakeup)).await;
    h1.command(Op::Stop).await;
    let bytes = snapshot(m.id, 10);
    send_stopped(&h1, m.id, &bytes[..bytes.len() / 2], 1 << 20, 10).await;
    let x = phase(&mut admin, m.id, "aborted").await;
    assert!(
        x.abort_reason.contains("snapshot truncated"),
        "{}",
        x.abort_reason
    );
    r.halt().await;
    drop((h1, h2));
    r.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_aborts_before_the_switchover_and_finishes_after() {
    let dir = temp("restart");
    let mut r = Running::start(&dir).await;
    let (mut admin, h1, mut h2) = setup(&r).await;
    let m1 = start(&mut admin).await;
    prepare(&mut h2, m1.id).await;
    phase(&mut admin, m1.id, "syncing").await;
    r.halt().await;
    drop((h1, h2, admin));
    r.stop().await;

    // Restarted: the migration that had not switched over is aborted.
    let mut r = Running::start(&dir).await;
    let mut admin = r.admin().await;
    let x = list(&mut admin).await.pop().unwrap();
    assert_eq!(x.phase().name(), "aborted");
    assert_eq!(
        x.abort_reason,
        "the controller restarted before the switchover"
    );
    let mut h1 = Agent::connect(&r.url, "h1", "10.0.0.1").await;
    let mut h2 = Agent::connect(&r.url, "h2", "10.0.0.2").await;
    assert!(h1.items["port/veth1"].get("standby").is_none());
    assert!(!h2.items.contains_key("port/veth1"));

    // A migration that had: the source stopped and handed over, the
    // destination had not answered. The restarted controller keeps the
    // source stopped and sends the destination the kept state again.
    let m2 = start(&mut admin).await;
    prepare(&mut h2, m2.id).await;
    h2.event(event(m2.id, "veth1", Kind::Wakeup)).await;
    h1.command(Op::Stop).await;
    let bytes = snapshot(m2.id, 50);
    send_stopped(&h1, m2.id, &bytes, 1 << 20, 50).await;
    h2.command(Op::Start).await;
    phase(&mut admin, m2.id, "activating").await;
    r.halt().await;
    drop((h1, h2, admin));
    r.stop().await;

    let mut r = Running::start(&dir).await;
    let mut admin = r.admin().await;
    assert_eq!(
        list(&mut admin).await.pop().unwrap().phase().name(),
        "activating"
    );
    let h1 = Agent::connect(&r.url, "h1", "10.0.0.1").await;
    assert_eq!(
        h1.items["port/veth1"]["standby"], true,
        "the source stays stopped"
    );
    let mut h2 = Agent::connect(&r.url, "h2", "10.0.0.2").await;
    let start = h2.command(Op::Start).await;
    assert_eq!(start.chunk, bytes);
    h2.event(event(m2.id, "veth1", Kind::Started)).await;
    let x = phase(&mut admin, m2.id, "done").await;
    assert_eq!(x.connections, 50);
    r.halt().await;
    drop((h1, h2, admin));
    r.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_while_activating_resumes_the_source_once_the_destination_let_go() {
    let dir = temp("letgo");
    let mut r = Running::start(&dir).await;
    let (mut admin, mut h1, mut h2) = setup(&r).await;
    let m = start(&mut admin).await;
    prepare(&mut h2, m.id).await;
    h2.event(event(m.id, "veth1", Kind::Wakeup)).await;
    h1.command(Op::Stop).await;
    send_stopped(&h1, m.id, &snapshot(m.id, 10), 1 << 20, 10).await;
    // h2 is told to start; before it says it did, an admin aborts.
    h2.command(Op::Start).await;
    phase(&mut admin, m.id, "activating").await;
    admin
        .abort_migration(api::MigrationRef {
            id: m.id,
            ..Default::default()
        })
        .await
        .unwrap();
    // h1 hears nothing yet: h2 may be forwarding.
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(Ok(Some(x))) =
        tokio::time::timeout(Duration::from_millis(20), h1.rx.message()).await
    {
        if let Some(Msg::Migration(c)) = x.msg {
            assert_ne!(
                c.op,
                Op::Resume as i32,
                "resumed while the destination may forward"
            );
        }
    }
    // h2 drops the port (its next state) and acks it: now h1 resumes.
    h2.until(|a| !a.items.contains_key("port/veth1")).await;
    let resume = h1.command(Op::Resume).await;
    assert_eq!(resume.migration, m.id);
    r.halt().await;
    drop((h1, h2, admin));
    r.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_whose_interface_never_appears_is_aborted_naming_it() {
    let dir = temp("iface");
    let mut r =
        Running::start_with(&dir, |c| c.with_interface_timeout(Duration::from_secs(1))).await;
    let (mut admin, h1, mut h2) = setup(&r).await;
    let m = admin
        .start_migration(api::StartMigrationRequest {
            port: "veth1".into(),
            to: "h2".into(),
            netdev: "vnet7".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // The destination has the port with its policy: prepared, waiting.
    prepare(&mut h2, m.id).await;
    assert_eq!(h2.items["port/veth1"]["netdev"], "vnet7");
    phase(&mut admin, m.id, "syncing").await;
    // The interface never appears: the migration's own timeout aborts it.
    let mut x = None;
    for _ in 0..100 {
        let y = list(&mut admin)
            .await
            .into_iter()
            .find(|y| y.id == m.id)
            .unwrap();
        if y.phase().name() == "aborted" {
            x = Some(y);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let x = x.expect("the migration was aborted");
    assert_eq!(
        x.abort_reason,
        "host h2: interface `vnet7` did not appear within 1 s"
    );
    assert_eq!(x.destination_interface, "vnet7");
    r.halt().await;
    drop((admin, h1, h2));
    r.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Maintenance: a draining host gets no new port, bound or migrated (the
/// reason says so and nothing changes), `host list` says so; a host is
/// removed only when nothing is left on it and its agent is stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_host_takes_nothing_new_and_only_an_empty_one_is_removed() {
    let dir = temp("drain");
    let mut r = Running::start(&dir).await;
    let (mut admin, h1, h2) = setup(&r).await;
    let h = admin
        .drain_host(api::DrainHostRequest {
            host: "h2".into(),
            off: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(h.draining && h.name == "h2");
    let hosts = admin
        .list_hosts(api::Empty {})
        .await
        .unwrap()
        .into_inner()
        .hosts;
    assert!(hosts.iter().any(|h| h.name == "h2" && h.draining));
    assert!(hosts.iter().any(|h| h.name == "h1" && !h.draining));
    let before = admin
        .show_chassis(api::Empty {})
        .await
        .unwrap()
        .into_inner();
    // Toward it: refused, naming the drain and the way out.
    let e = admin
        .start_migration(api::StartMigrationRequest {
            port: "veth1".into(),
            to: "h2".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("host h2 is draining"), "{e}");
    assert!(e.message().contains("dvs host drain h2 --off"), "{e}");
    let e = admin
        .create_port(api::CreatePortRequest {
            vm: "vm9".into(),
            mac: "02:00:00:00:00:09".into(),
            profile: "web".into(),
            host: "h2".into(),
            tap: "t9".into(),
            netdev: String::new(),
            ips: Vec::new(),
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("draining"), "{e}");
    let after = admin
        .show_chassis(api::Empty {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before.revision, after.revision, "a refusal changes nothing");
    assert_eq!(before.ports.len(), after.ports.len());
    // A host with a port, or a connected agent, is not removed.
    let e = admin
        .remove_host(api::Name { name: "h1".into() })
        .await
        .unwrap_err();
    assert!(e.message().contains("connected"), "{e}");
    drop(h1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let e = admin
        .remove_host(api::Name { name: "h1".into() })
        .await
        .unwrap_err();
    assert!(e.message().contains("still has ports veth1"), "{e}");
    // The empty one goes once its agent stopped.
    drop(h2);
    tokio::time::sleep(Duration::from_millis(200)).await;
    admin
        .remove_host(api::Name { name: "h2".into() })
        .await
        .unwrap();
    let hosts = admin
        .list_hosts(api::Empty {})
        .await
        .unwrap()
        .into_inner()
        .hosts;
    assert!(hosts.iter().all(|h| h.name != "h2"), "{hosts:?}");
    let e = admin
        .remove_host(api::Name { name: "h2".into() })
        .await
        .unwrap_err();
    assert!(e.message().contains("no host `h2`"), "{e}");
    r.halt().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The pre-copy of migration `m` sent by the source and taken by the
/// destination: its bytes, and where the source is told to copy the VM's
/// frames.
async fn presync(h1: &mut Agent, h2: &mut Agent, m: u64) -> (Vec<u8>, String) {
    let copy_to = h1.command(Op::Sync).await.redirect;
    let port = PortId::new(1).unwrap();
    let state = dvs_switch::tracked_port_state(20);
    let events = dvs_switch::agent::migration::synced_events(m, port, state).unwrap();
    let bytes: Vec<u8> = events.iter().flat_map(|e| e.chunk.clone()).collect();
    for e in events {
        h1.event(e).await;
    }
    let pre = h2.command(Op::Presync).await;
    assert_eq!(pre.chunk, bytes);
    (bytes, copy_to)
}

/// h2 heard the VM and forwards from the pre-copy.
fn started(m: u64) -> api::MigrationEvent {
    api::MigrationEvent {
        started: true,
        at_us: 42,
        ..event(m, "veth1", Kind::Wakeup)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_heard_the_vm_finishes_without_its_source() {
    let dir = temp("nosource");
    let mut r = Running::start(&dir).await;
    let (mut admin, mut h1, mut h2) = setup(&r).await;
    let m = start(&mut admin).await;
    prepare(&mut h2, m.id).await;
    let (base, copy_to) = presync(&mut h1, &mut h2, m.id).await;
    assert_eq!(
        copy_to, "10.0.0.2",
        "the source copies the VM's frames to h2"
    );
    h2.event(started(m.id)).await;
    h1.command(Op::Stop).await;
    let x = phase(&mut admin, m.id, "switching").await;
    assert_eq!(x.destination_started_us, 42);
    // The source dies before its handover: the destination keeps what
    // the pre-copy had (it is sent it again as the state to merge).
    drop(h1);
    let start = h2.command(Op::Start).await;
    assert_eq!(start.chunk, base);
    h2.event(event(m.id, "veth1", Kind::Started)).await;
    let x = phase(&mut admin, m.id, "done").await;
    assert_eq!(x.snapshot_bytes, 0, "no handover came");
    h2.until(|a| {
        a.items
            .get("port/veth1")
            .is_some_and(|p| p.get("standby").is_none())
    })
    .await;
    r.halt().await;
    drop(h2);
    r.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_goes_on_with_a_destination_that_started_unheard() {
    let dir = temp("unheard");
    let mut r = Running::start(&dir).await;
    let (mut admin, mut h1, mut h2) = setup(&r).await;
    let m = start(&mut admin).await;
    prepare(&mut h2, m.id).await;
    presync(&mut h1, &mut h2, m.id).await;
    phase(&mut admin, m.id, "syncing").await;
    // h2 hears the VM and starts, but the controller dies before it hears.
    r.halt().await;
    drop((h1, h2, admin));
    r.stop().await;

    let mut r = Running::start(&dir).await;
    let mut admin = r.admin().await;
    assert_eq!(
        list(&mut admin).await.pop().unwrap().phase().name(),
        "syncing"
    );
    let mut h1 = Agent::connect(&r.url, "h1", "10.0.0.1").await;
    // Back, h2 says what it does before it acknowledges the state.
    let mut h2 = Agent::connect_telling(&r.url, "h2", "10.0.0.2", vec![started(m.id)]).await;
    h1.command(Op::Stop).await;
    send_stopped(&h1, m.id, &snapshot(m.id, 30), 1 << 20, 30).await;
    h2.command(Op::Start).await;
    h2.event(event(m.id, "veth1", Kind::Started)).await;
    let x = phase(&mut admin, m.id, "done").await;
    assert_eq!((x.connections, x.destination_started_us), (30, 42));

    // Had it not started, its first acknowledgement aborts the migration.
    let m2 = admin
        .start_migration(api::StartMigrationRequest {
            port: "veth1".into(),
            to: "h1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    h1.until(|a| {
        a.items
            .get("port/veth1")
            .is_some_and(|p| p["standby"] == true && p["migration"] == m2.id)
    })
    .await;
    presync(&mut h2, &mut h1, m2.id).await;
    r.halt().await;
    drop((h1, h2, admin));
    r.stop().await;
    let mut r = Running::start(&dir).await;
    let mut admin = r.admin().await;
    let h1 = Agent::connect(&r.url, "h1", "10.0.0.1").await;
    let x = phase(&mut admin, m2.id, "aborted").await;
    assert_eq!(
        x.abort_reason,
        "the controller restarted before the switchover"
    );
    r.halt().await;
    drop((h1, admin));
    r.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Thirty-two migrations at once share the controller's one path to their
/// destination (a host evacuated in a chassis): thirty-one pre-copies of
/// megabytes each are on their way to h2 when the first migration's VM
/// runs there — its switchover reaches h2 ahead of them (the stream's
/// urgent lane), after its own pre-copy, with at most what the transport
/// had already taken of the others in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_does_not_wait_behind_other_migrations_pre_copies() {
    const N: u32 = 32;
    let dir = temp("lanes");
    let mut r = Running::start(&dir).await;
    let (mut admin, mut h1, mut h2) = setup(&r).await;
    for i in 2..=N {
        admin
            .create_port(api::CreatePortRequest {
                vm: format!("vm{i}"),
                mac: format!("02:00:00:00:01:{i:02x}"),
                profile: "web".into(),
                host: "h1".into(),
                tap: format!("t{i}"),
                netdev: String::new(),
                ips: Vec::new(),
            })
            .await
            .unwrap();
    }
    let mut ids = Vec::new();
    for i in 1..=N {
        let m = admin
            .start_migration(api::StartMigrationRequest {
                port: format!("veth{i}"),
                to: "h2".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        ids.push(m.id);
    }
    h2.until(|a| {
        (1..=N).all(|i| {
            a.items
                .get(&format!("port/veth{i}"))
                .is_some_and(|p| p["standby"] == true)
        })
    })
    .await;
    for _ in 0..N {
        h1.command(Op::Sync).await;
    }
    // The first migration's pre-copy is small; the others' are megabytes.
    let big = dvs_switch::tracked_port_state(20_000);
    let mut big_chunks = 0;
    for (i, &m) in ids.iter().enumerate() {
        let port = PortId::new(i as u32 + 1).unwrap();
        let state = if i == 0 {
            dvs_switch::tracked_port_state(20)
        } else {
            big.clone()
        };
        let events = dvs_switch::agent::migration::synced_events(m, port, state).unwrap();
        if i > 0 {
            big_chunks += events.len();
        }
        for e in events {
            h1.event(e).await;
        }
    }
    assert!(big_chunks >= 2 * (N as usize - 1), "{big_chunks} chunks");
    let first = ids[0];
    for _ in 0..500 {
        let m = list(&mut admin).await;
        if m.iter().any(|x| x.id == first && x.base_snapshot_bytes > 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // h2 hears the first VM and forwards from its pre-copy; h1 stops and
    // hands over — behind the other pre-copies on h1's own stream.
    h2.event(started(first)).await;
    let stop = h1.command(Op::Stop).await;
    assert_eq!(stop.migration, first);
    let h = Handover {
        transfer: Transfer {
            state: dvs_switch::tracked_port_state(20),
            gone: Vec::new(),
            since_base: Duration::from_millis(5),
        },
        delta: false,
        connections: 20,
        last_from_vm: Some(Duration::from_micros(1)),
        last_to_vm: None,
    };
    let port = PortId::new(1).unwrap();
    for e in dvs_switch::agent::migration::stopped_events(first, port, h).unwrap() {
        h1.event(e).await;
    }
    // Once the controller has the handover (behind the other pre-copies on
    // h1's stream) and has sent START (right after, in the same task), h2
    // reads: what came before the first one's START?
    phase(&mut admin, first, "activating").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut seen = Vec::new();
    let start_at = loop {
        h2.next().await;
        seen.extend(h2.commands.drain(..).map(|c| (c.op, c.migration, c.more)));
        if let Some(i) = seen
            .iter()
            .position(|&(op, m, _)| op == Op::Start as i32 && m == first)
        {
            break i;
        }
    };
    let before = &seen[..start_at];
    assert!(
        before
            .iter()
            .any(|&(op, m, more)| op == Op::Presync as i32 && m == first && !more),
        "its own pre-copy first: {before:?}"
    );
    let others = before
        .iter()
        .filter(|&&(op, m, _)| op == Op::Presync as i32 && m != first)
        .count();
    eprintln!(
        "{others} of {big_chunks} chunks of other pre-copies reached h2 before the switchover"
    );
    assert!(
        others < big_chunks / 4,
        "{others} of {big_chunks} chunks of other pre-copies came first"
    );
    // The others all arrive after it, whole.
    while seen
        .iter()
        .filter(|&&(op, m, more)| op == Op::Presync as i32 && m != first && !more)
        .count()
        < N as usize - 1
    {
        h2.next().await;
        seen.extend(h2.commands.drain(..).map(|c| (c.op, c.migration, c.more)));
    }
    r.halt().await;
    drop((h1, h2));
    r.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A destination that forwards the port (it heard the VM) and then loses
/// its session is not aborted: the VM runs there. Back without the port
/// (its agent restarted and lost it), the migration is aborted naming
/// that; back saying it still forwards, it gets what it missed and the
/// migration finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_forwards_and_disconnects_is_waited_for() {
    let dir = temp("away");
    let mut r = Running::start(&dir).await;
    let (mut admin, mut h1, mut h2) = setup(&r).await;
    // Back without the port: aborted, the source takes the port back.
    let m = start(&mut admin).await;
    prepare(&mut h2, m.id).await;
    presync(&mut h1, &mut h2, m.id).await;
    h2.event(started(m.id)).await;
    h1.command(Op::Stop).await;
    phase(&mut admin, m.id, "switching").await;
    drop(h2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(phase(&mut admin, m.id, "switching").await.abort_reason, "");
    let mut h2 = Agent::connect(&r.url, "h2", "10.0.0.2").await;
    let x = phase(&mut admin, m.id, "aborted").await;
    assert_eq!(
        x.abort_reason,
        "host h2 came back without the port it had started"
    );
    // The source forwards again once the destination let the port go.
    h2.until(|a| !a.items.contains_key("port/veth1")).await;
    h1.command(Op::Resume).await;
    drop(h2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Away while the source hands over: the destination gets the pre-copy
    // and the handover when it is back, saying it forwards.
    let mut h2 = Agent::connect(&r.url, "h2", "10.0.0.2").await;
    h1.until(|a| {
        a.items
            .get("port/veth1")
            .is_some_and(|p| p.get("standby").is_none())
    })
    .await;
    let m = start(&mut admin).await;
    prepare(&mut h2, m.id).await;
    let (base, _) = presync(&mut h1, &mut h2, m.id).await;
    h2.event(started(m.id)).await;
    h1.command(Op::Stop).await;
    phase(&mut admin, m.id, "switching").await;
    drop(h2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let bytes = snapshot(m.id, 30);
    send_stopped(&h1, m.id, &bytes, 1 << 20, 30).await;
    phase(&mut admin, m.id, "activating").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(phase(&mut admin, m.id, "activating").await.abort_reason, "");
    let mut h2 = Agent::connect_telling(&r.url, "h2", "10.0.0.2", vec![started(m.id)]).await;
    let pre = h2.command(Op::Presync).await;
    assert_eq!(pre.chunk, base, "the pre-copy again");
    let start = h2.command(Op::Start).await;
    assert_eq!(start.chunk, bytes, "the handover it missed");
    h2.event(event(m.id, "veth1", Kind::Started)).await;
    let x = phase(&mut admin, m.id, "done").await;
    assert_eq!(x.snapshot_bytes, bytes.len() as u64);
    h2.until(|a| {
        a.items
            .get("port/veth1")
            .is_some_and(|p| p.get("standby").is_none())
    })
    .await;
    r.halt().await;
    drop((h1, h2));
    r.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
