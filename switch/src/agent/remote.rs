//! The agent under a controller (`dvs agent --host H --controller URL
//! --tunnel-ip IP --state-dir DIR`).
//!
//! Two threads: the datapath loop of [`agent::run_with`] and a control
//! thread (tokio) that holds the session with the controller. The session
//! registers, receives the host's full state and then deltas as keyed items
//! of an agent file, puts them together, checks the result with the same
//! code as `dvs agent --config`, hands it to the datapath loop (which changes
//! only what differs), saves it to `DIR/desired.json` and acknowledges the
//! revision. Every 2 s it reports the host's counters.
//!
//! Headless: when the controller is away the datapath keeps forwarding with
//! what it has, and the session is retried (0.5 s, doubling to 5 s). An
//! agent that starts while the controller is away runs its ports from the
//! saved state; on reconnection, only real differences are applied.
//!
//! Migrations: the session also carries the controller's migration
//! commands (stop, start, resume, announce — see [`crate::agent::migration`]) to
//! the datapath loop, and its events back; a stopped port's state travels
//! to the controller as a `dvs_migrate` snapshot in chunks of 1 MiB, and
//! comes to the destination the same way.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dvs_proto::api::{self, agent_client::AgentClient, agent_message, controller_message};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_stream::wrappers::ReceiverStream;

use crate::agent::config::{assemble, AgentConfig};
use crate::agent::migration::{self, Command, Event, Inbox};
use crate::agent::{self, ControlLink, Update};
use crate::Error;

/// How the agent meets its controller.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    pub host: String,
    pub controller: String,
    pub tunnel_ip: IpAddr,
    pub state_dir: PathBuf,
    /// Where to write the stats document every second, if anywhere.
    pub stats_file: Option<PathBuf>,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<std::net::SocketAddr>,
    /// Mutual TLS with the controller.
    pub tls: Option<ClientTls>,
}

/// The agent's TLS files (PEM): the CA of the controller's certificate, and
/// the agent's own certificate (naming its host) and key.
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl ClientTls {
    fn config(&self) -> Result<tonic::transport::ClientTlsConfig, String> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        Ok(tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(read(&self.ca)?))
            .identity(tonic::transport::Identity::from_pem(
                read(&self.cert)?,
                read(&self.key)?,
            )))
    }
}

/// What the agent last applied, as saved in the state directory.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Cache {
    revision: u64,
    items: BTreeMap<String, Value>,
}

const CACHE: &str = "desired.json";

impl RemoteOptions {
    fn local(&self) -> Value {
        let mut v = json!({ "tunnel": { "local": self.tunnel_ip.to_string() } });
        if let Some(f) = &self.stats_file {
            v["stats_file"] = json!(f);
        }
        v
    }

    fn config(&self, items: &BTreeMap<String, Value>) -> Result<AgentConfig, String> {
        let doc = assemble(&self.host, items, &self.local());
        AgentConfig::parse(&doc.to_string())
    }
}

fn load_cache(dir: &Path) -> Option<Cache> {
    let text = std::fs::read_to_string(dir.join(CACHE)).ok()?;
    match serde_json::from_str(&text) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(error = %e, "the saved state is unreadable; starting empty");
            None
        }
    }
}

fn save_cache(dir: &Path, c: &Cache) -> std::io::Result<()> {
    let tmp = dir.join(format!("{CACHE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(c).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(tmp, dir.join(CACHE))
}

/// Run the agent under the controller until SIGTERM.
///
/// # Errors
/// The state directory cannot be made, the saved state does not validate,
/// or the datapath cannot start.
pub fn run(opts: &RemoteOptions) -> Result<(), Error> {
    std::fs::create_dir_all(&opts.state_dir).map_err(|e| {
        Error::io(
            format!("creating the state directory {}", opts.state_dir.display()),
            e,
        )
    })?;
    let cache = load_cache(&opts.state_dir).unwrap_or_default();
    let cfg = opts.config(&cache.items).map_err(|msg| Error::Config {
        path: opts.state_dir.join(CACHE).display().to_string(),
        msg,
    })?;
    if cache.revision > 0 {
        tracing::info!(
            revision = cache.revision,
            ports = cfg.ports.len(),
            "restored the saved state"
        );
    }
    let (updates_tx, updates) = std::sync::mpsc::channel();
    let (wake, wake_tx) =
        UnixStream::pair().map_err(|e| Error::io("making the control link", e))?;
    let stats = Arc::new(Mutex::new(String::new()));
    let revision = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (commands_tx, commands) = std::sync::mpsc::channel();
    let (events, events_rx) = tokio::sync::mpsc::unbounded_channel();
    let link = ControlLink {
        updates,
        wake,
        stats: stats.clone(),
        revision,
        commands,
        events,
    };
    let control = Control {
        opts: opts.clone(),
        cache,
        updates: updates_tx,
        wake: wake_tx,
        stats,
        commands: commands_tx,
        events: events_rx,
        incoming: Inbox::default(),
    };
    std::thread::Builder::new()
        .name("dvs-control".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the control thread's runtime");
                    return;
                }
            };
            rt.block_on(control.run());
        })
        .map_err(|e| Error::io("starting the control thread", e))?;
    agent::run_with(&cfg, None, Some(link), opts.metrics)
}

/// The control side.
#[derive(Debug)]
struct Control {
    opts: RemoteOptions,
    cache: Cache,
    updates: Sender<Update>,
    wake: UnixStream,
    stats: Arc<Mutex<String>>,
    commands: Sender<Command>,
    events: tokio::sync::mpsc::UnboundedReceiver<Event>,
    /// Snapshots arriving in chunks.
    incoming: Inbox,
}

type Outbox = tokio::sync::mpsc::Sender<api::AgentMessage>;

async fn send_event(out: &Outbox, e: api::MigrationEvent) -> Result<(), String> {
    out.send(api::AgentMessage {
        msg: Some(agent_message::Msg::Migration(e)),
    })
    .await
    .map_err(|e| e.to_string())
}

impl Control {
    /// Do what the controller asks of this host in a migration (the
    /// datapath's part on its loop, waited for off this thread); report
    /// what came of it.
    async fn migration(&mut self, c: api::MigrationCommand, out: &Outbox) -> Result<(), String> {
        let mut inbox = std::mem::take(&mut self.incoming);
        let commands = self.commands.clone();
        let wake = self
            .wake
            .try_clone()
            .map_err(|e| format!("the control link: {e}"))?;
        let (inbox, events) = tokio::task::spawn_blocking(move || {
            let events = migration::carry_out(&mut inbox, &c, |cmd| {
                let sent = commands.send(cmd).is_ok();
                let _ = (&wake).write_all(&[1]);
                sent
            });
            (inbox, events)
        })
        .await
        .map_err(|e| e.to_string())?;
        self.incoming = inbox;
        for e in events {
            send_event(out, e).await?;
        }
        Ok(())
    }

    async fn run(mut self) {
        let mut backoff = Duration::from_millis(500);
        loop {
            match self.session().await {
                Ok(()) => {
                    tracing::warn!("the controller ended the session; headless until it is back");
                    backoff = Duration::from_millis(500);
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "no controller session; forwarding headless");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn session(&mut self) -> Result<(), String> {
        let mut ep = tonic::transport::Channel::from_shared(self.opts.controller.clone())
            .map_err(|e| format!("controller URL {}: {e}", self.opts.controller))?;
        if let Some(t) = &self.opts.tls {
            ep = ep
                .tls_config(t.config()?)
                .map_err(|e| format!("TLS: {e}"))?;
        }
        let ch = ep
            .connect_timeout(Duration::from_secs(3))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| format!("connecting to {}: {e}", self.opts.controller))?;
        let mut client = AgentClient::new(ch)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let (out, out_rx) = tokio::sync::mpsc::channel(16);
        let send = |m: agent_message::Msg| api::AgentMessage { msg: Some(m) };
        out.send(send(agent_message::Msg::Register(api::Register {
            host: self.opts.host.clone(),
            tunnel_ip: self.opts.tunnel_ip.to_string(),
            revision: self.cache.revision,
        })))
        .await
        .map_err(|e| e.to_string())?;
        let mut inbound = client
            .session(ReceiverStream::new(out_rx))
            .await
            .map_err(|s| format!("the controller refused the session: {}", s.message()))?
            .into_inner();
        tracing::info!(controller = %self.opts.controller, "connected to the controller");
        let mut report = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                m = inbound.message() => {
                    let m = m.map_err(|s| format!("session: {}", s.message()))?;
                    let Some(m) = m else { return Ok(()) };
                    let (revision, items, resync) = match m.msg {
                        Some(controller_message::Msg::Full(f)) => {
                            let mut items = BTreeMap::new();
                            for i in f.items {
                                items.insert(i.key, parse_item(&i.json)?);
                            }
                            (f.revision, items, true)
                        }
                        Some(controller_message::Msg::Delta(d)) => {
                            let mut items = self.cache.items.clone();
                            for i in d.upsert {
                                items.insert(i.key, parse_item(&i.json)?);
                            }
                            for k in d.remove {
                                items.remove(&k);
                            }
                            (d.revision, items, false)
                        }
                        Some(controller_message::Msg::Migration(c)) => {
                            self.migration(c, &out).await?;
                            continue;
                        }
                        None => continue,
                    };
                    if self.apply(revision, items, resync).await {
                        out.send(send(agent_message::Msg::Ack(api::Ack { revision })))
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                }
                Some(e) = self.events.recv() => {
                    send_event(&out, migration::report(e)).await?;
                }
                _ = report.tick() => {
                    let s = self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    if !s.is_empty() {
                        out.send(send(agent_message::Msg::Report(api::Report { stats_json: s })))
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                }
            }
        }
    }

    /// Check and apply a desired state; true when all of it runs.
    async fn apply(&mut self, revision: u64, items: BTreeMap<String, Value>, resync: bool) -> bool {
        let cfg = match self.opts.config(&items) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(revision, error = %e, "the controller's state does not validate here; not applied");
                return false;
            }
        };
        let (done, result) = sync_channel(1);
        if self
            .updates
            .send(Update {
                revision,
                config: cfg,
                resync,
                done,
            })
            .is_err()
        {
            return false;
        }
        let _ = (&self.wake).write_all(&[1]);
        let r = tokio::task::spawn_blocking(move || result.recv())
            .await
            .ok()
            .and_then(Result::ok);
        // Applied or not, this is what the datapath now works from.
        self.cache = Cache { revision, items };
        if let Err(e) = save_cache(&self.opts.state_dir, &self.cache) {
            tracing::warn!(error = %e, "cannot save the state");
        }
        match r {
            Some(Ok(_)) => true,
            Some(Err(e)) => {
                tracing::error!(revision, error = %e, "revision applied in part");
                false
            }
            None => false,
        }
    }
}

fn parse_item(json: &str) -> Result<Value, String> {
    serde_json::from_str(json).map_err(|e| format!("an item from the controller is not JSON: {e}"))
}
