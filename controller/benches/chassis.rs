//! The controller at scale, in one process: a real controller (its redb
//! store, its gRPC services on loopback) and simulated agents — one gRPC
//! connection and session each, acknowledging every revision as soon as it
//! arrives — for 100 hosts × 100 ports and 1,000 hosts × 50 ports.
//!
//! Prints: the initial full sync of every host, the time from a profile
//! change (one applied through the admin service) to every agent's
//! acknowledgement, the full-sync time of a host that reconnects, and the
//! controller's memory (the simulated agents run in a child process). Ports sit in tenant VLANs spread over groups of 10
//! hosts, so each host learns the VMs of its VLANs on 9 other hosts.
//!
//! Run: `cargo bench -p dvs-controller --bench chassis` (or
//! `-- 100x100` / `-- 1000x50` for one size). References: OVN reports
//! ~11 s for a full sync of 1,000 hypervisors / 10k ports; a Nexus 1000V
//! supervisor manages 64–250 hosts; a vSphere switch 1,000–2,000 hosts.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use dvs_controller::chassis::{Attach, Chassis};
use dvs_controller::server::{serve_on, Controller};
use dvs_controller::store::Store;
use dvs_proto::api::{self, agent_client::AgentClient, agent_message, controller_message};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

/// Hosts per tenant group; each group has `VLANS_PER_GROUP` VLANs.
const GROUP: usize = 10;
const VLANS_PER_GROUP: usize = 5;

fn profiles(acl_port: u16, groups: usize) -> String {
    let mut y = format!(
        "kind: PortProfile\nname: base\nacl:\n  in:\n    - {{ action: deny, proto: tcp, dst_port: {acl_port} }}\n    - {{ action: permit }}\n"
    );
    for v in 0..groups * VLANS_PER_GROUP {
        y.push_str(&format!(
            "---\nkind: PortProfile\nname: t{v}\ninherit: base\nvlan: {{ mode: access, id: {} }}\n",
            100 + v
        ));
    }
    y
}

fn tunnel_ip(h: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 1 + (h / 250) as u8, (h % 250) as u8, 1))
}

fn rss_mb() -> f64 {
    rss_of("/proc/self/status")
}

fn rss_of(status: &str) -> f64 {
    let s = std::fs::read_to_string(status).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<f64>().ok())
        .map_or(0.0, |k| k / 1024.0)
}

/// What a simulated agent tells the bench (a line on the agents'
/// process's stdout).
#[derive(Debug)]
enum Event {
    Full {
        host: usize,
        took: Duration,
        items: usize,
    },
    Acked {
        host: usize,
        revision: u64,
    },
}

impl Event {
    fn line(&self) -> String {
        match self {
            Event::Full { host, took, items } => {
                format!("full {host} {} {items}", took.as_secs_f64())
            }
            Event::Acked { host, revision } => format!("ack {host} {revision}"),
        }
    }

    fn parse(l: &str) -> Option<Event> {
        let f: Vec<&str> = l.split_whitespace().collect();
        match f.as_slice() {
            ["full", h, t, n] => Some(Event::Full {
                host: h.parse().ok()?,
                took: Duration::from_secs_f64(t.parse().ok()?),
                items: n.parse().ok()?,
            }),
            ["ack", h, r] => Some(Event::Acked {
                host: h.parse().ok()?,
                revision: r.parse().ok()?,
            }),
            _ => None,
        }
    }
}

/// The agents' process: one simulated agent per host; events to stdout;
/// `reconnect H` on stdin ends host H's session and opens a new one.
async fn agents(url: String, hosts: usize) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let (ev_tx, mut ev) = mpsc::unbounded_channel::<Event>();
    let mut stops = Vec::new();
    for h in 0..hosts {
        let (s, r) = watch::channel(false);
        stops.push(s);
        tokio::spawn(agent(url.clone(), h, ev_tx.clone(), r));
    }
    tokio::spawn(async move {
        let mut out = tokio::io::stdout();
        while let Some(e) = ev.recv().await {
            if out
                .write_all(format!("{}\n", e.line()).as_bytes())
                .await
                .is_err()
            {
                return;
            }
            let _ = out.flush().await;
        }
    });
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(l)) = lines.next_line().await {
        if let Some(h) = l
            .strip_prefix("reconnect ")
            .and_then(|h| h.parse::<usize>().ok())
        {
            let _ = stops[h].send(true);
            let (s, r) = watch::channel(false);
            stops[h] = s;
            tokio::spawn(agent(url.clone(), h, ev_tx.clone(), r));
        }
    }
}

/// One simulated agent: a session that acks everything; ends when `stop`
/// turns true.
async fn agent(
    url: String,
    host: usize,
    events: mpsc::UnboundedSender<Event>,
    mut stop: watch::Receiver<bool>,
) {
    let t0 = Instant::now();
    let send = |m| api::AgentMessage { msg: Some(m) };
    // A thousand hosts connecting at once overflow the listen backlog, and
    // a host that just left may count as connected for a moment more: an
    // agent retries, as real ones do.
    let mut tries = 0;
    let (out, mut inbound) = loop {
        tries += 1;
        assert!(tries < 500, "h{host} could not open a session");
        let Ok(ch) = tonic::transport::Channel::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
        else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let mut client = AgentClient::new(ch).max_decoding_message_size(64 << 20);
        let (out, rx) = mpsc::channel(16);
        out.send(send(agent_message::Msg::Register(api::Register {
            host: format!("h{host}"),
            tunnel_ip: tunnel_ip(host).to_string(),
            revision: 0,
        })))
        .await
        .unwrap();
        match client.session(ReceiverStream::new(rx)).await {
            Ok(s) => break (out, s.into_inner()),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    loop {
        tokio::select! {
            m = inbound.message() => {
                let Ok(Some(m)) = m else { return };
                let revision = match m.msg {
                    Some(controller_message::Msg::Full(f)) => {
                        // An agent parses what it gets.
                        let n = f.items.iter().filter(|i| serde_json::from_str::<serde_json::Value>(&i.json).is_ok()).count();
                        let _ = events.send(Event::Full { host, took: t0.elapsed(), items: n });
                        f.revision
                    }
                    Some(controller_message::Msg::Delta(d)) => {
                        for i in &d.upsert {
                            let _ = serde_json::from_str::<serde_json::Value>(&i.json);
                        }
                        d.revision
                    }
                    // No migrations in this benchmark.
                    Some(controller_message::Msg::Migration(_)) | None => continue,
                };
                if out.send(send(agent_message::Msg::Ack(api::Ack { revision }))).await.is_err() {
                    return;
                }
                let _ = events.send(Event::Acked { host, revision });
            }
            _ = stop.changed() => return,
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

async fn run(hosts: usize, ports_per_host: usize) {
    println!("== {hosts} hosts × {ports_per_host} ports");
    let rss0 = rss_mb();
    let dir =
        std::env::temp_dir().join(format!("dvs-bench-chassis-{}-{hosts}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let groups = hosts.div_ceil(GROUP);
    // The chassis, built in memory and stored at once.
    let t = Instant::now();
    let mut c = Chassis::default();
    c.apply(&profiles(1, groups), false).unwrap();
    for h in 0..hosts {
        let group = h / GROUP;
        for i in 0..ports_per_host {
            let n = h * ports_per_host + i;
            let mac = format!(
                "02:{:02x}:{:02x}:{:02x}:{:02x}:01",
                (n >> 24) & 0xff,
                (n >> 16) & 0xff,
                (n >> 8) & 0xff,
                n & 0xff
            );
            let vlan = group * VLANS_PER_GROUP + i % VLANS_PER_GROUP;
            let id = c
                .create_port(&format!("vm{n}"), &mac, &format!("t{vlan}"), &[])
                .unwrap();
            c.bind_port(id, &format!("h{h}"), Attach::Tap(format!("tap{i}")))
                .unwrap();
        }
        c.register(&format!("h{h}"), tunnel_ip(h)).unwrap();
    }
    let store = Store::open(&dir).unwrap();
    store.commit(&c, &c.clone().take_dirty()).unwrap();
    drop(store);
    drop(c);
    let controller = Controller::open(&dir).unwrap();
    println!(
        "built and stored {} ports in {:.2} s",
        hosts * ports_per_host,
        t.elapsed().as_secs_f64()
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop_srv, stopped) = tokio::sync::oneshot::channel::<()>();
    let srv = tokio::spawn(serve_on(controller.clone(), listener, None, async {
        let _ = stopped.await;
    }));
    let rss_loaded = rss_mb();

    // Every host connects: its initial full sync. The simulated agents run
    // in a child process, so that this process's memory is the controller's.
    let t = Instant::now();
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["agents", &url, &hosts.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut to_agents = child.stdin.take().unwrap();
    let from_agents = child.stdout.take().unwrap();
    let (ev_tx, mut ev) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(from_agents).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            if let Some(e) = Event::parse(&l) {
                let _ = ev_tx.send(e);
            }
        }
    });
    let mut full = Vec::new();
    let mut items = 0;
    let mut acked = vec![0u64; hosts];
    while full.len() < hosts {
        match ev.recv().await.unwrap() {
            Event::Full { took, items: n, .. } => {
                full.push(took.as_secs_f64());
                items += n;
            }
            Event::Acked { host, revision } => acked[host] = acked[host].max(revision),
        }
    }
    let all = t.elapsed().as_secs_f64();
    println!(
        "initial full sync: all {hosts} hosts in {all:.2} s; per host median {:.3} s, p99 {:.3} s; {} items per host on average",
        median(&mut full.clone()),
        pct(&mut full, 0.99),
        items / hosts
    );
    // Drain the initial acks.
    let rev0 = controller.snapshot().revision();
    while acked.iter().any(|a| *a < rev0) {
        if let Event::Acked { host, revision } = ev.recv().await.unwrap() {
            acked[host] = acked[host].max(revision);
        }
    }
    let rss_sessions = rss_mb();

    // A profile change (the base ACL every port inherits), to every ack.
    let admin_ch = tonic::transport::Channel::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut admin =
        api::admin_client::AdminClient::new(admin_ch).max_encoding_message_size(16 << 20);
    let mut change = Vec::new();
    for k in 0..5u16 {
        let t = Instant::now();
        let r = admin
            .apply_profiles(api::ApplyRequest {
                yaml: profiles(1000 + k, groups),
                dry_run: false,
            })
            .await
            .unwrap()
            .into_inner();
        let rev = r.revision;
        while acked.iter().any(|a| *a < rev) {
            if let Event::Acked { host, revision } = ev.recv().await.unwrap() {
                acked[host] = acked[host].max(revision);
            }
        }
        change.push(t.elapsed().as_secs_f64());
    }
    println!(
        "profile change to every host's ack: median {:.3} s of 5 (min {:.3}, max {:.3})",
        median(&mut change.clone()),
        change.iter().copied().fold(f64::MAX, f64::min),
        change.iter().copied().fold(0.0, f64::max)
    );

    // A host reconnects: its full sync, while the others stay connected.
    let mut re = Vec::new();
    for k in 0..10 {
        let h = (k * 7919) % hosts;
        {
            use tokio::io::AsyncWriteExt;
            to_agents
                .write_all(format!("reconnect {h}\n").as_bytes())
                .await
                .unwrap();
        }
        loop {
            match ev.recv().await.unwrap() {
                Event::Full { host, took, .. } if host == h => {
                    re.push(took.as_secs_f64());
                    break;
                }
                _ => {}
            }
        }
    }
    println!(
        "a reconnecting host's full sync: median {:.3} s of 10 (max {:.3})",
        median(&mut re.clone()),
        re.iter().copied().fold(0.0, f64::max)
    );
    let store_mb =
        std::fs::metadata(dir.join("chassis.redb")).map_or(0.0, |m| m.len() as f64 / 1e6);
    let agents_mb = child
        .id()
        .map_or(0.0, |pid| rss_of(&format!("/proc/{pid}/status")));
    println!(
        "controller memory (RSS of its process): {:.0} MB at start, {:.0} MB with the chassis loaded, {:.0} MB with {hosts} sessions; store file {store_mb:.1} MB (the simulated agents' process: {agents_mb:.0} MB)\n",
        rss0, rss_loaded, rss_sessions
    );
    drop(to_agents);
    let _ = child.kill().await;
    let _ = stop_srv.send(());
    let _ = srv.await;
    drop(controller);
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if args.first().map(String::as_str) == Some("agents") {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(agents(args[1].clone(), args[2].parse().unwrap()));
        return;
    }
    let sizes: Vec<(usize, usize)> = if args.is_empty() {
        vec![(100, 100), (1000, 50)]
    } else {
        args.iter()
            .filter_map(|a| {
                let (h, p) = a.split_once('x')?;
                Some((h.parse().ok()?, p.parse().ok()?))
            })
            .collect()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    for (h, p) in sizes {
        rt.block_on(run(h, p));
    }
}
