//! The agent under a controller (`dvs agent --host H --controller URL
//! --tunnel-ip IP --state-dir DIR`).
//!
//! Two threads: the datapath loop of [`agent::run_with`], which runs the
//! [agent core](crate::agent::core) — it puts the controller's items
//! together, checks them with the same code as `dvs agent --config`,
//! applies what differs, carries out migration commands and reports — and
//! this session thread (tokio), a transport: it registers, hands every
//! message from the controller to the datapath loop (and wakes it), sends
//! what the core has for the controller — pre-copies in the stream's bulk
//! lane, behind everything a switchover waits for
//! ([`dvs_migrate::lanes`]) — and saves the state the core runs to
//! `DIR/desired.json` before the acknowledgement that follows it.
//!
//! Headless: when the controller is away the datapath keeps forwarding with
//! what it has, and the session is retried (0.5 s, doubling to 5 s); the
//! reports of that time are dropped. An agent that starts while the
//! controller is away runs its ports from the saved state; on
//! reconnection, only real differences are applied.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::time::Duration;

use dvs_migrate::lanes::{lanes, Lanes};
use dvs_proto::api::{self, agent_client::AgentClient, agent_message};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::agent::core::{desired_config, Desired, Outbound};
use crate::agent::{self, ControlLink};
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

/// The file in the state directory that holds the desired state the agent
/// runs ([`Desired`]).
const CACHE: &str = "desired.json";

impl RemoteOptions {
    fn local(&self) -> Value {
        let mut v = json!({ "tunnel": { "local": self.tunnel_ip.to_string() } });
        if let Some(f) = &self.stats_file {
            v["stats_file"] = json!(f);
        }
        v
    }
}

fn load_cache(dir: &Path) -> Option<Desired> {
    let text = std::fs::read_to_string(dir.join(CACHE)).ok()?;
    match serde_json::from_str(&text) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(error = %e, "the saved state is unreadable; starting empty");
            None
        }
    }
}

fn save_cache(dir: &Path, c: &Desired) -> std::io::Result<()> {
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
    let cfg =
        desired_config(&opts.host, &cache.items, &opts.local()).map_err(|msg| Error::Config {
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
    let (inbound_tx, inbound) = std::sync::mpsc::channel();
    let (wake, wake_tx) =
        UnixStream::pair().map_err(|e| Error::io("making the control link", e))?;
    let (outbound, outbound_rx) = tokio::sync::mpsc::unbounded_channel();
    let link = ControlLink {
        inbound,
        wake,
        outbound,
        desired: cache.clone(),
        local: opts.local(),
    };
    let session = Session {
        opts: opts.clone(),
        saved: cache,
        inbound: inbound_tx,
        wake: wake_tx,
        outbound: outbound_rx,
        held: Vec::new(),
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
            rt.block_on(session.run());
        })
        .map_err(|e| Error::io("starting the control thread", e))?;
    agent::run_with(&cfg, None, Some(link), opts.metrics)
}

/// The session thread: the controller's messages to the datapath loop,
/// the core's to the controller.
#[derive(Debug)]
struct Session {
    opts: RemoteOptions,
    /// The desired state last saved (its revision goes in the register).
    saved: Desired,
    inbound: Sender<api::ControllerMessage>,
    wake: UnixStream,
    outbound: UnboundedReceiver<Outbound>,
    /// What came for the controller while it was away (reports aside).
    held: Vec<agent_message::Msg>,
}

/// Messages kept for the next session, at most (the oldest go first).
const MAX_HELD: usize = 1024;

impl Session {
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
            // Headless: the state is still saved; reports are dropped,
            // the rest waits for the next session.
            let retry = tokio::time::sleep(backoff);
            tokio::pin!(retry);
            let mut pending = Vec::new();
            loop {
                tokio::select! {
                    () = &mut retry => break,
                    Some(o) = self.outbound.recv() => match o {
                        Outbound::Save(d) => self.save(d).await,
                        Outbound::Send(agent_message::Msg::Report(_)) => {}
                        Outbound::Send(m) => pending.push(m),
                    },
                }
            }
            self.held.extend(pending);
            let over = self.held.len().saturating_sub(MAX_HELD);
            self.held.drain(..over);
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn save(&mut self, d: Desired) {
        let dir = self.opts.state_dir.clone();
        let copy = d.clone();
        let r = tokio::task::spawn_blocking(move || save_cache(&dir, &copy)).await;
        if let Ok(Err(e)) = r {
            tracing::warn!(error = %e, "cannot save the state");
        }
        self.saved = d;
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
        let (out, out_rx) = lanes();
        put(
            &out,
            agent_message::Msg::Register(api::Register {
                host: self.opts.host.clone(),
                tunnel_ip: self.opts.tunnel_ip.to_string(),
                revision: self.saved.revision,
            }),
        )?;
        let mut inbound = client
            .session(out_rx)
            .await
            .map_err(|s| format!("the controller refused the session: {}", s.message()))?
            .into_inner();
        tracing::info!(controller = %self.opts.controller, "connected to the controller");
        for m in std::mem::take(&mut self.held) {
            put(&out, m)?;
        }
        loop {
            tokio::select! {
                m = inbound.message() => {
                    let m = m.map_err(|s| format!("session: {}", s.message()))?;
                    let Some(m) = m else { return Ok(()) };
                    if self.inbound.send(m).is_err() {
                        return Err("the datapath loop is gone".into());
                    }
                    let _ = (&self.wake).write_all(&[1]);
                }
                Some(o) = self.outbound.recv() => match o {
                    Outbound::Save(d) => self.save(d).await,
                    Outbound::Send(m) => put(&out, m)?,
                },
            }
        }
    }
}

/// Send `m` on the session's stream: a pre-copy's chunks in the bulk lane,
/// everything else ahead of them (see [`dvs_migrate::lanes`]).
fn put(out: &Lanes<api::AgentMessage>, m: agent_message::Msg) -> Result<(), String> {
    let key = match &m {
        agent_message::Msg::Migration(e) => Some(e.migration),
        _ => None,
    };
    let pre_copy = matches!(&m, agent_message::Msg::Migration(e)
        if e.kind == api::migration_event::Kind::Synced as i32);
    let m = api::AgentMessage { msg: Some(m) };
    match key {
        Some(k) if pre_copy => out.bulk(k, m),
        _ => out.urgent(key, m),
    }
    .map_err(|e| format!("session: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};
    use tokio_stream::Stream;

    fn migration(id: u64, kind: api::migration_event::Kind) -> agent_message::Msg {
        agent_message::Msg::Migration(api::MigrationEvent {
            migration: id,
            kind: kind as i32,
            ..Default::default()
        })
    }

    #[test]
    fn pre_copies_go_behind_what_a_switchover_waits_for() {
        use api::migration_event::Kind;
        let (out, mut rx) = lanes();
        put(&out, migration(2, Kind::Synced)).unwrap();
        put(&out, migration(1, Kind::Synced)).unwrap();
        put(&out, migration(2, Kind::Synced)).unwrap();
        put(&out, agent_message::Msg::Ack(api::Ack { revision: 7 })).unwrap();
        put(&out, migration(1, Kind::Stopped)).unwrap();
        let mut cx = Context::from_waker(Waker::noop());
        let mut order = Vec::new();
        while let Poll::Ready(Some(m)) = Pin::new(&mut rx).poll_next(&mut cx) {
            order.push(match m.msg {
                Some(agent_message::Msg::Migration(e)) => (e.migration, e.kind),
                Some(agent_message::Msg::Ack(_)) => (0, 0),
                other => panic!("{other:?}"),
            });
        }
        let (synced, stopped) = (Kind::Synced as i32, Kind::Stopped as i32);
        // The ack first; migration 1's handover after its own pre-copy;
        // migration 2's pre-copy last.
        assert_eq!(
            order,
            [(0, 0), (1, synced), (1, stopped), (2, synced), (2, synced)]
        );
    }
}
