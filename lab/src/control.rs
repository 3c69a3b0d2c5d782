//! The lab's embedded controller: `dvs controller`'s own services, called
//! in process — no socket between them and their clients — on a runtime
//! that runs only when the lab pumps it, and on the lab's clock.
//!
//! The admin calls go through the command-line client (`dvs`'s own
//! rendering of every view); each host's agent session is the gRPC
//! `Session` stream of `dvs agent`, its messages handed over in memory.

use std::time::Duration;

use dvs_controller::client::{self, Command, Output};
use dvs_controller::server::{AdminService, Clock, Controller};
use dvs_proto::api::{self, agent_message};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::fabric::VirtualClock;
use crate::LabError;

/// Scheduler turns the controller's runtime gets per pump: enough for a
/// message to go from an agent through the controller and back.
const PUMP_TURNS: usize = 24;

/// An agent session of a lab host: what it sends, and what it receives
/// (kept open, so that the host stays connected).
struct Session {
    tx: tokio::sync::mpsc::UnboundedSender<api::AgentMessage>,
    /// What the controller sends (a task of the runtime reads the stream).
    inbound: std::sync::mpsc::Receiver<api::ControllerMessage>,
}

/// The lab's embedded controller and its hosts' sessions.
pub struct Control {
    rt: tokio::runtime::Runtime,
    controller: Controller,
    admin: api::admin_client::AdminClient<AdminService>,
    dir: std::path::PathBuf,
    sessions: Vec<Session>,
    /// Something was sent that the controller has not taken yet.
    pending: bool,
}

impl Drop for Control {
    fn drop(&mut self) {
        self.sessions.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn ctl_err(what: &str, e: impl std::fmt::Display) -> LabError {
    LabError::Controller(format!("{what}: {e}"))
}

impl Control {
    /// A controller with a fresh store in a temporary directory, on the
    /// lab's clock (`epoch` is the wall-clock time the lab began).
    pub fn start(clock: &VirtualClock, epoch: Duration) -> Result<Self, LabError> {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("dvs-lab-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // One thread, and only when the lab pumps it: the order of what
        // the controller does is the same on every run.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| ctl_err("starting the controller's runtime", e))?;
        let c = clock.clone();
        let controller = Controller::open(&dir)
            .map_err(|e| ctl_err("opening the controller's store", e))?
            .with_clock(Clock(std::sync::Arc::new(move || epoch + c.now())));
        let admin = api::admin_client::AdminClient::new(controller.admin())
            .max_decoding_message_size(dvs_controller::server::MAX_MESSAGE)
            .max_encoding_message_size(dvs_controller::server::MAX_MESSAGE);
        Ok(Control {
            rt,
            controller,
            admin,
            dir,
            sessions: Vec::new(),
            pending: false,
        })
    }

    /// Run an admin command as `dvs` does; returns what it prints.
    pub fn view(&mut self, cmd: Command, out: Output) -> Result<String, LabError> {
        let r = self
            .rt
            .block_on(client::call(&mut self.admin, cmd, out))
            .map_err(|e| ctl_err("the controller", e));
        self.pending = true;
        self.pump();
        r
    }

    /// Host `name` registers as an agent from `tunnel` and gets its state.
    pub fn register(&mut self, name: &str, tunnel: std::net::IpAddr) -> Result<(), LabError> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let _ = tx.send(api::AgentMessage {
            msg: Some(agent_message::Msg::Register(api::Register {
                host: name.to_string(),
                tunnel_ip: tunnel.to_string(),
                revision: 0,
            })),
        });
        let (fwd, inbound) = std::sync::mpsc::channel();
        let mut client = api::agent_client::AgentClient::new(self.controller.agent());
        self.rt.block_on(async move {
            let mut stream = client
                .session(UnboundedReceiverStream::new(rx))
                .await
                .map_err(|s| ctl_err("registering", s.message()))?
                .into_inner();
            tokio::spawn(async move {
                while let Ok(Some(m)) = stream.message().await {
                    if fwd.send(m).is_err() {
                        return;
                    }
                }
            });
            Ok::<_, LabError>(())
        })?;
        self.sessions.push(Session { tx, inbound });
        self.pending = true;
        Ok(())
    }

    /// Send host `i`'s agent message (the controller takes it at the next
    /// [`Control::pump`]).
    pub fn send(&mut self, i: usize, m: agent_message::Msg) {
        let _ = self.sessions[i].tx.send(api::AgentMessage { msg: Some(m) });
        self.pending = true;
    }

    /// What the controller has sent host `i` since last asked.
    pub fn inbound(&self, i: usize) -> Vec<api::ControllerMessage> {
        self.sessions[i].inbound.try_iter().collect()
    }

    /// Let the controller take what was sent and answer.
    pub fn pump(&mut self) {
        if !std::mem::take(&mut self.pending) {
            return;
        }
        self.rt.block_on(async {
            for _ in 0..PUMP_TURNS {
                tokio::task::yield_now().await;
            }
        });
    }

    /// The controller's periodic work (its migration timeouts), on the
    /// lab's clock.
    pub fn timers(&mut self) {
        let c = self.controller.clone();
        self.rt.block_on(async move { c.expire_migrations().await });
        self.pending = true;
        self.pump();
    }
}
