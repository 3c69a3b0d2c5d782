//! The controller's gRPC services: `Admin` for the CLI and `Agent` for the
//! hosts.
//!
//! One lock guards the chassis and its store; an operation checks, changes
//! and commits under it, then publishes the new revision on a watch channel.
//! Each agent session waits on that channel, computes its host's items and
//! sends the difference from what it sent before (a delta), or everything
//! at the start (the full state). An agent acknowledges each revision once
//! applied, so the controller knows how far every host has converged.
//!
//! Here: the controller's state, the lock and the commit, serving. By
//! concern: `auth` (TLS, client certificates, the admin token), `admin`
//! (the admin service), `agent` (agent sessions; what a host is sent is
//! the sans-IO `HostFeed`), `views` (ports, hosts, documents, metrics),
//! `migration` (the controller's side of live migrations).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dvs_migrate::lanes::Lanes;
use dvs_proto::api;
use dvs_proto::stats::Stats;
use tokio::sync::watch;
use tonic::Status;

use crate::chassis::Chassis;
use crate::store::Store;
use crate::Error;

/// The largest message either service takes (an apply of 1 MiB fits).
pub const MAX_MESSAGE: usize = 4 << 20;

mod admin;
mod agent;
mod auth;
mod migration;
mod views;

pub use auth::{TlsFiles, TokenCheck};

/// An agent's stream: revisions and commands, pre-copies behind them.
type Outbox = Lanes<Result<api::ControllerMessage, Status>>;

/// A connected agent.
#[derive(Debug, Clone)]
struct Session {
    peer: String,
    /// When it registered (the controller's clock).
    since: Duration,
    /// Its stream (for migration commands).
    tx: Outbox,
}

#[derive(Debug)]
struct State {
    chassis: Chassis,
    store: Store,
    sessions: BTreeMap<String, Session>,
    /// Each host's last stats report.
    reports: BTreeMap<String, Stats>,
    /// When each revision was made (for convergence lag).
    revised: BTreeMap<u64, Duration>,
}

/// The controller: chassis, store, sessions.
#[derive(Debug, Clone)]
pub struct Controller {
    state: Arc<Mutex<State>>,
    revision: watch::Sender<u64>,
    admin_token: Option<Arc<str>>,
    /// Agents must present a client certificate for the host they register.
    agent_certs: bool,
    /// Shutting down: sessions end because of it, not because hosts left.
    closing: Arc<std::sync::atomic::AtomicBool>,
    /// A migration whose destination port has no interface by then is
    /// aborted ([`migration::INTERFACE_TIMEOUT`] by default).
    interface_timeout: std::time::Duration,
    /// The wall clock (time since the Unix epoch) that migration timelines,
    /// timeouts and convergence lag read.
    clock: Clock,
}

/// The admin service, its token checked.
pub type AdminService = tonic::service::interceptor::InterceptedService<
    api::admin_server::AdminServer<Controller>,
    TokenCheck,
>;

/// A wall clock: the time since the Unix epoch.
#[derive(Clone)]
pub struct Clock(pub Arc<dyn Fn() -> Duration + Send + Sync>);

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clock({:?})", (self.0)())
    }
}

fn status(e: Error) -> Status {
    match e {
        Error::Invalid(m) => Status::invalid_argument(m),
        Error::NotFound(m) => Status::not_found(m),
        Error::Conflict(m) => Status::failed_precondition(m),
        e @ Error::Store { .. } => Status::internal(e.to_string()),
    }
}

impl Controller {
    /// A controller over the store in `data_dir` (state reloaded from it).
    ///
    /// # Errors
    /// The store cannot be opened or read.
    pub fn open(data_dir: &std::path::Path) -> Result<Self, Error> {
        let store = Store::open(data_dir)?;
        let mut chassis = store.load()?;
        // Migrations cut short by the restart end consistently now.
        let wait = migration::PREPARE_TIMEOUT;
        for (id, out) in chassis.recover_migrations(migration::unix_now(), wait) {
            tracing::warn!(
                migration = id,
                ?out,
                "migration aborted: the controller restarted before its switchover"
            );
        }
        let dirty = chassis.take_dirty();
        store.commit(&chassis, &dirty)?;
        let rev = chassis.revision();
        Ok(Controller {
            state: Arc::new(Mutex::new(State {
                chassis,
                store,
                sessions: BTreeMap::new(),
                reports: BTreeMap::new(),
                revised: BTreeMap::new(),
            })),
            revision: watch::Sender::new(rev),
            admin_token: None,
            agent_certs: false,
            closing: Arc::default(),
            interface_timeout: migration::INTERFACE_TIMEOUT,
            clock: Clock(Arc::new(migration::unix_now)),
        })
    }

    /// Read time from `clock` instead of the system's (the lab's virtual
    /// clock).
    #[must_use]
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The controller's wall clock now.
    fn now(&self) -> Duration {
        (self.clock.0)()
    }

    /// Abort migrations whose destination port has not found its interface
    /// `timeout` after they began.
    #[must_use]
    pub fn with_interface_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.interface_timeout = timeout;
        self
    }

    /// Require of every agent a client certificate (checked by the TLS
    /// layer against the client CA) that names the host it registers.
    #[must_use]
    pub fn with_agent_certificates(mut self) -> Self {
        self.agent_certs = true;
        self
    }

    /// Require `token` on every admin call.
    #[must_use]
    pub fn with_admin_token(mut self, token: &str) -> Self {
        self.admin_token = Some(Arc::from(token));
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run `f` on the chassis and commit what it changed (durably unless
    /// `durable` is false); on a store failure the chassis is reloaded from
    /// the store, so memory never runs ahead of the disk.
    fn mutate<T>(
        &self,
        durable: bool,
        f: impl FnOnce(&mut Chassis) -> Result<T, Error>,
    ) -> Result<T, Status> {
        self.mutate_keeping(durable, None, f)
    }

    /// [`Controller::mutate`], keeping a migration's snapshot with the
    /// change in one transaction.
    fn mutate_keeping<T>(
        &self,
        durable: bool,
        handover: Option<(crate::store::Kept, u64, &[u8])>,
        f: impl FnOnce(&mut Chassis) -> Result<T, Error>,
    ) -> Result<T, Status> {
        let now = self.now();
        let mut st = self.lock();
        let before = st.chassis.revision();
        let v = f(&mut st.chassis).map_err(status)?;
        let dirty = st.chassis.take_dirty();
        // The commit may wait for the disk (fsync) with the lock held —
        // memory never runs ahead of the store. On a multi-threaded
        // runtime this worker's other tasks (streams, keepalives) move to
        // another worker meanwhile instead of waiting behind it.
        let commit = || st.store.commit_with(&st.chassis, &dirty, durable, handover);
        let committed = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(commit)
            }
            _ => commit(),
        };
        if let Err(e) = committed {
            tracing::error!(error = %e, "store commit failed; state reloaded");
            if let Ok(c) = st.store.load() {
                st.chassis = c;
            }
            return Err(status(e));
        }
        let rev = st.chassis.revision();
        if rev != before {
            st.revised.insert(rev, now);
            // Keep the lag clock of recent revisions only.
            while st.revised.len() > 4096 {
                st.revised.pop_first();
            }
            drop(st);
            self.revision.send_replace(rev);
        }
        Ok(v)
    }

    /// The chassis as it is now (for views and tests).
    pub fn snapshot(&self) -> Chassis {
        self.lock().chassis.clone()
    }

    /// The admin service.
    pub fn admin(&self) -> AdminService {
        let server = api::admin_server::AdminServer::new(self.clone())
            .max_decoding_message_size(MAX_MESSAGE);
        tonic::service::interceptor::InterceptedService::new(
            server,
            TokenCheck {
                token: self.admin_token.clone(),
            },
        )
    }

    /// The agent service.
    pub fn agent(&self) -> api::agent_server::AgentServer<Self> {
        api::agent_server::AgentServer::new(self.clone()).max_decoding_message_size(MAX_MESSAGE)
    }
}

/// Serve both services on a bound listener (with TLS when `tls` is given)
/// until `shutdown` resolves.
///
/// # Errors
/// The TLS configuration is refused, or serving failed.
pub async fn serve_on(
    controller: Controller,
    listener: tokio::net::TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let mut b = tonic::transport::Server::builder();
    if let Some(t) = tls {
        b = b.tls_config(t)?;
    }
    tokio::spawn(controller.clone().migration_timer());
    let closing = controller.closing.clone();
    let shutdown = async move {
        shutdown.await;
        // Migrations stay as they are: the next start takes them up.
        closing.store(true, std::sync::atomic::Ordering::SeqCst);
    };
    b.http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(controller.admin())
        .add_service(controller.agent())
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await
}
