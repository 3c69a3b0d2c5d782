//! The controller's gRPC services: `Admin` for the CLI and `Agent` for the
//! hosts.
//!
//! One lock guards the chassis and its store; an operation checks, changes
//! and commits under it, then publishes the new revision on a watch channel.
//! Each agent session waits on that channel, computes its host's items and
//! sends the difference from what it sent before (a delta), or everything
//! at the start (the full state). An agent acknowledges each revision once
//! applied, so the controller knows how far every host has converged.

use dvs_proto::stats::{Attachment, Stats};
use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dvs_proto::api::{self, agent_message, controller_message};
use dvs_proto::PortId;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::chassis::{Attach, Chassis, Kind, PortRec};
use crate::store::Store;
use crate::Error;

/// The largest message either service takes (an apply of 1 MiB fits).
pub const MAX_MESSAGE: usize = 4 << 20;

mod migration;

type Outbox = mpsc::Sender<Result<api::ControllerMessage, Status>>;

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

/// The files of the services' TLS: the controller's certificate and key
/// (PEM), and the CA that agents' client certificates must chain to.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub client_ca: std::path::PathBuf,
}

impl TlsFiles {
    /// The server configuration: mutual TLS, a client certificate being
    /// required of agents (admin calls authenticate with the token).
    ///
    /// # Errors
    /// [`Error::Invalid`] naming a file that cannot be read.
    pub fn server_config(&self) -> Result<tonic::transport::ServerTlsConfig, Error> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| Error::Invalid(format!("{}: {e}", p.display())))
        };
        let id = tonic::transport::Identity::from_pem(read(&self.cert)?, read(&self.key)?);
        let ca = tonic::transport::Certificate::from_pem(read(&self.client_ca)?);
        Ok(tonic::transport::ServerTlsConfig::new()
            .identity(id)
            .client_ca_root(ca)
            .client_auth_optional(true))
    }
}

/// Is the DER certificate `leaf` valid for the DNS name `host`?
fn cert_names(leaf: &[u8], host: &str) -> Result<(), String> {
    let der = rustls_pki_types::CertificateDer::from(leaf);
    let cert = webpki::EndEntityCert::try_from(&der)
        .map_err(|e| format!("unreadable certificate: {e:?}"))?;
    let name = rustls_pki_types::ServerName::try_from(host)
        .map_err(|_| format!("`{host}` cannot be a certificate name"))?;
    cert.verify_is_valid_for_subject_name(&name)
        .map_err(|_| format!("the client certificate does not name host {host}"))
}

/// Admin calls must carry `authorization: Bearer TOKEN` when the
/// controller has a token.
#[derive(Debug, Clone)]
pub struct TokenCheck {
    token: Option<Arc<str>>,
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(want) = &self.token else {
            return Ok(req);
        };
        let got = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match got {
            None => Err(Status::unauthenticated(
                "admin calls need the controller's token: pass --token or set DVS_TOKEN",
            )),
            Some(t) if same(t.as_bytes(), want.as_bytes()) => Ok(req),
            Some(_) => Err(Status::unauthenticated("the admin token is wrong")),
        }
    }
}

/// Equal, in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
        for (id, out) in chassis.recover_migrations(migration::unix_now()) {
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

    fn port_view(&self, st: &State, p: &PortRec) -> api::Port {
        let (host, tap, netdev) = match &p.binding {
            Some(b) => match &b.attach {
                Attach::Tap(t) => (b.host.clone(), t.clone(), String::new()),
                Attach::Netdev(n) => (b.host.clone(), String::new(), n.clone()),
                Attach::Unnamed => (b.host.clone(), String::new(), String::new()),
            },
            None => Default::default(),
        };
        let id = p.id.to_string();
        let stats = st
            .reports
            .get(&host)
            .and_then(|r| r.ports.iter().find(|x| x.id == id));
        let connected = st.sessions.contains_key(&host);
        let attachment = stats
            .and_then(|s| s.attachment.as_ref())
            .map(|a| a.detail.clone())
            .unwrap_or_default();
        let attached = stats.is_some_and(|s| {
            s.attachment
                .as_ref()
                .is_none_or(|a| matches!(a.state, Attachment::Attached { .. }))
        });
        let state = match (&p.binding, stats, connected) {
            (None, ..) => api::PortState::Unbound,
            (Some(_), Some(_), true) if attached => api::PortState::Up,
            (Some(_), Some(_), true) => api::PortState::Waiting,
            (Some(_), _, false) => api::PortState::HostDown,
            (Some(_), ..) => api::PortState::Pending,
        };
        let vlan = match st.chassis.policy(&p.profile).and_then(|x| x.vlan.as_ref()) {
            Some(dvs_proto::VlanMode::Access(v)) => format!("access {v}"),
            Some(dvs_proto::VlanMode::Trunk { allowed, native }) => match native {
                Some(n) => format!("trunk {allowed} native {n}"),
                None => format!("trunk {allowed}"),
            },
            None => String::new(),
        };
        api::Port {
            id: p.id.to_string(),
            vm: p.vm.clone(),
            mac: p.mac.to_string(),
            profile: p.profile.clone(),
            profile_version: st
                .chassis
                .doc(Kind::PortProfile, &p.profile)
                .map_or(0, |d| d.version),
            host,
            tap,
            netdev,
            state: state as i32,
            vlan,
            stats_json: stats
                .and_then(|s| serde_json::to_string(s).ok())
                .unwrap_or_default(),
            attachment,
        }
    }

    fn host_views(&self, st: &State) -> Vec<api::Host> {
        let now = self.now();
        st.chassis
            .hosts()
            .map(|h| {
                // Lag: how long the oldest revision the host has not yet
                // applied has been waiting.
                let lag = if h.acked >= h.desired {
                    0.0
                } else {
                    st.revised
                        .range(h.acked + 1..)
                        .next()
                        .map_or(0.0, |(_, t)| now.saturating_sub(*t).as_secs_f64())
                };
                api::Host {
                    name: h.name.clone(),
                    module: h.module,
                    tunnel_ip: h.tunnel_ip.map(|i| i.to_string()).unwrap_or_default(),
                    connected: st.sessions.contains_key(&h.name),
                    desired_revision: h.desired,
                    acked_revision: h.acked,
                    lag_seconds: lag,
                    ports: st.chassis.host_port_count(&h.name) as u32,
                }
            })
            .collect()
    }

    /// Prometheus metrics: the chassis revision, every host's connection,
    /// revisions and convergence lag, ports by state, and the counters and
    /// drops by reason that each host last reported.
    pub fn metrics(&self) -> String {
        use dvs_metrics::{family, sample};
        let st = self.lock();
        let mut o = String::new();
        family(
            &mut o,
            "dvs_chassis_revision",
            "gauge",
            "The chassis configuration revision.",
        );
        sample(
            &mut o,
            "dvs_chassis_revision",
            &[],
            st.chassis.revision() as f64,
        );
        let hosts = self.host_views(&st);
        for (name, help) in [
            (
                "dvs_host_connected",
                "1 while the host's agent has a session.",
            ),
            (
                "dvs_host_desired_revision",
                "The revision of the host's last change.",
            ),
            (
                "dvs_host_acked_revision",
                "The revision the host says it runs.",
            ),
            (
                "dvs_host_convergence_lag_seconds",
                "How long the host's oldest unapplied change has waited.",
            ),
            ("dvs_host_ports", "Ports bound to the host."),
        ] {
            family(&mut o, name, "gauge", help);
            for h in &hosts {
                let v = match name {
                    "dvs_host_connected" => f64::from(u8::from(h.connected)),
                    "dvs_host_desired_revision" => h.desired_revision as f64,
                    "dvs_host_acked_revision" => h.acked_revision as f64,
                    "dvs_host_convergence_lag_seconds" => h.lag_seconds,
                    _ => f64::from(h.ports),
                };
                sample(
                    &mut o,
                    name,
                    &[("host", &h.name), ("module", &h.module.to_string())],
                    v,
                );
            }
        }
        let mut states: BTreeMap<&str, u64> = BTreeMap::new();
        for p in st.chassis.ports() {
            *states
                .entry(self.port_view(&st, p).state().name())
                .or_default() += 1;
        }
        family(
            &mut o,
            "dvs_ports",
            "gauge",
            "Ports of the chassis, by state.",
        );
        for (s, n) in states {
            sample(&mut o, "dvs_ports", &[("state", s)], n as f64);
        }
        let reports: Vec<(&Stats, Option<u64>)> = st
            .reports
            .iter()
            .map(|(h, r)| (r, st.chassis.host(h).map(|x| x.acked)))
            .collect();
        o.push_str(&dvs_metrics::agents(&reports));
        o
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

fn parse_port(id: &str) -> Result<PortId, Status> {
    id.parse::<PortId>()
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

fn attach(tap: &str, netdev: &str, later: bool) -> Result<Attach, Status> {
    match (tap.is_empty(), netdev.is_empty(), later) {
        (false, true, false) => Ok(Attach::Tap(tap.to_string())),
        (true, false, false) => Ok(Attach::Netdev(netdev.to_string())),
        (true, true, true) => Ok(Attach::Unnamed),
        _ => Err(Status::invalid_argument(
            "give exactly one of --tap NAME (the agent creates the TAP), --netdev IFACE (an interface the VMM makes, now or later) or --netdev-later (the VMM names it later)",
        )),
    }
}

#[tonic::async_trait]
impl api::admin_server::Admin for Controller {
    async fn apply_profiles(
        &self,
        req: Request<api::ApplyRequest>,
    ) -> Result<Response<api::ApplyReply>, Status> {
        let r = req.into_inner();
        let changes = self.mutate(true, |c| c.apply(&r.yaml, r.dry_run))?;
        Ok(Response::new(api::ApplyReply {
            applied: !r.dry_run && !changes.is_empty(),
            changes,
            revision: self.lock().chassis.revision(),
        }))
    }

    async fn list_profiles(
        &self,
        _: Request<api::Empty>,
    ) -> Result<Response<api::ProfileList>, Status> {
        let st = self.lock();
        let profiles = st
            .chassis
            .docs()
            .map(|d| doc_view(&st.chassis, d))
            .collect();
        Ok(Response::new(api::ProfileList { profiles }))
    }

    async fn get_profile(&self, req: Request<api::Name>) -> Result<Response<api::Profile>, Status> {
        let name = req.into_inner().name;
        let st = self.lock();
        let d = st
            .chassis
            .doc(Kind::PortProfile, &name)
            .or_else(|| st.chassis.doc(Kind::NetflowMonitor, &name))
            .ok_or_else(|| Status::not_found(format!("no profile or monitor `{name}`")))?;
        Ok(Response::new(doc_view(&st.chassis, d)))
    }

    async fn delete_profile(
        &self,
        req: Request<api::Name>,
    ) -> Result<Response<api::ApplyReply>, Status> {
        let name = req.into_inner().name;
        let kind = {
            let st = self.lock();
            if st.chassis.doc(Kind::PortProfile, &name).is_some() {
                Kind::PortProfile
            } else {
                Kind::NetflowMonitor
            }
        };
        let changes = self.mutate(true, |c| c.delete_doc(kind, &name))?;
        Ok(Response::new(api::ApplyReply {
            changes,
            applied: true,
            revision: self.lock().chassis.revision(),
        }))
    }

    async fn create_port(
        &self,
        req: Request<api::CreatePortRequest>,
    ) -> Result<Response<api::Port>, Status> {
        let r = req.into_inner();
        let bind = if r.host.is_empty() {
            if !r.tap.is_empty() || !r.netdev.is_empty() {
                return Err(Status::invalid_argument(
                    "--tap/--netdev need --host: the host the port goes on",
                ));
            }
            None
        } else {
            Some(attach(&r.tap, &r.netdev, false)?)
        };
        let id = self.mutate(true, |c| {
            // Checked whole: a bad binding leaves no port behind.
            let mut next = c.clone();
            let id = next.create_port(&r.vm, &r.mac, &r.profile)?;
            if let Some(a) = bind {
                next.bind_port(id, &r.host, a)?;
            }
            *c = next;
            Ok(id)
        })?;
        let st = self.lock();
        let p = st
            .chassis
            .port(id)
            .ok_or_else(|| Status::internal("the new port vanished"))?;
        Ok(Response::new(self.port_view(&st, p)))
    }

    async fn list_ports(&self, _: Request<api::Empty>) -> Result<Response<api::PortList>, Status> {
        let st = self.lock();
        let ports = st.chassis.ports().map(|p| self.port_view(&st, p)).collect();
        Ok(Response::new(api::PortList { ports }))
    }

    async fn get_port(&self, req: Request<api::PortRef>) -> Result<Response<api::Port>, Status> {
        let id = parse_port(&req.into_inner().id)?;
        let st = self.lock();
        let p = st
            .chassis
            .port(id)
            .ok_or_else(|| Status::not_found(format!("no port {id}")))?;
        Ok(Response::new(self.port_view(&st, p)))
    }

    async fn delete_port(
        &self,
        req: Request<api::PortRef>,
    ) -> Result<Response<api::Empty>, Status> {
        let id = parse_port(&req.into_inner().id)?;
        self.mutate(true, |c| c.delete_port(id))?;
        Ok(Response::new(api::Empty {}))
    }

    async fn bind_port(
        &self,
        req: Request<api::BindPortRequest>,
    ) -> Result<Response<api::Port>, Status> {
        let r = req.into_inner();
        let id = parse_port(&r.id)?;
        if r.host.is_empty() {
            self.mutate(true, |c| c.unbind_port(id))?;
        } else {
            let a = attach(&r.tap, &r.netdev, r.netdev_later)?;
            self.mutate(true, |c| c.bind_port(id, &r.host, a))?;
        }
        let st = self.lock();
        let p = st
            .chassis
            .port(id)
            .ok_or_else(|| Status::not_found(format!("no port {id}")))?;
        Ok(Response::new(self.port_view(&st, p)))
    }

    async fn list_hosts(&self, _: Request<api::Empty>) -> Result<Response<api::HostList>, Status> {
        let st = self.lock();
        Ok(Response::new(api::HostList {
            hosts: self.host_views(&st),
        }))
    }

    async fn start_migration(
        &self,
        req: Request<api::StartMigrationRequest>,
    ) -> Result<Response<api::Migration>, Status> {
        self.begin(req.into_inner()).await.map(Response::new)
    }

    async fn activate_migration(
        &self,
        req: Request<api::MigrationRef>,
    ) -> Result<Response<api::Migration>, Status> {
        self.activate(req.into_inner()).await.map(Response::new)
    }

    async fn abort_migration(
        &self,
        req: Request<api::MigrationRef>,
    ) -> Result<Response<api::Migration>, Status> {
        self.abort(req.into_inner()).await.map(Response::new)
    }

    async fn list_migrations(
        &self,
        _: Request<api::Empty>,
    ) -> Result<Response<api::MigrationList>, Status> {
        Ok(Response::new(self.migration_list()))
    }

    async fn show_chassis(&self, _: Request<api::Empty>) -> Result<Response<api::Chassis>, Status> {
        let st = self.lock();
        Ok(Response::new(api::Chassis {
            revision: st.chassis.revision(),
            hosts: self.host_views(&st),
            ports: st.chassis.ports().map(|p| self.port_view(&st, p)).collect(),
        }))
    }
}

fn doc_view(c: &Chassis, d: &crate::chassis::Doc) -> api::Profile {
    let kind = match d.kind {
        Kind::PortProfile => "PortProfile",
        Kind::NetflowMonitor => "NetflowMonitor",
    };
    api::Profile {
        kind: kind.into(),
        name: d.name.clone(),
        version: d.version,
        yaml: serde_norway::to_string(&d.body).unwrap_or_default(),
        ports: c
            .ports()
            .filter(|p| d.kind == Kind::PortProfile && p.profile == d.name)
            .map(|p| p.id.to_string())
            .collect(),
    }
}

fn hash_of(v: &Value) -> u64 {
    let mut h = DefaultHasher::new();
    v.to_string().hash(&mut h);
    h.finish()
}

fn items_of(items: &BTreeMap<String, Value>) -> Vec<api::Item> {
    items
        .iter()
        .map(|(k, v)| api::Item {
            key: k.clone(),
            json: v.to_string(),
        })
        .collect()
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<api::ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl api::agent_server::Agent for Controller {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        req: Request<Streaming<api::AgentMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
        let peer = req
            .remote_addr()
            .map_or_else(|| "?".to_string(), |a| a.to_string());
        let certs = req.peer_certs();
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the stream ended before Register"))?;
        let Some(agent_message::Msg::Register(reg)) = first.msg else {
            return Err(Status::invalid_argument(
                "the first message of a session must be Register",
            ));
        };
        let host = reg.host.clone();
        if self.agent_certs {
            let leaf = certs.as_ref().and_then(|c| c.first().cloned()).ok_or_else(|| {
                Status::unauthenticated(
                    "agents need a client certificate signed by the controller's client CA (--tls-cert, --tls-key)",
                )
            })?;
            cert_names(&leaf, &host).map_err(|e| {
                Status::permission_denied(format!(
                    "{e}: an agent registers only the host its certificate names"
                ))
            })?;
        }
        let ip: IpAddr = reg.tunnel_ip.parse().map_err(|_| {
            Status::invalid_argument(format!(
                "tunnel_ip `{}` is not an IP address",
                reg.tunnel_ip
            ))
        })?;
        {
            let st = self.lock();
            if let Some(s) = st.sessions.get(&host) {
                return Err(Status::already_exists(format!(
                    "host {host} is connected already (from {}, for {:.0} s): another agent claims its name",
                    s.peer,
                    self.now().saturating_sub(s.since).as_secs_f64()
                )));
            }
        }
        let module = self.mutate(true, |c| c.register(&host, ip))?;
        let (tx, rx) = mpsc::channel(16);
        self.lock().sessions.insert(
            host.clone(),
            Session {
                peer: peer.clone(),
                since: self.now(),
                tx: tx.clone(),
            },
        );
        tracing::info!(%host, %peer, module, from_revision = reg.revision, "agent registered");
        let me = self.clone();
        tokio::spawn(async move {
            let r = me.serve_session(&host, module, inbound, tx.clone()).await;
            if let Err(s) = r {
                let _ = tx.send(Err(s)).await;
            }
            me.lock().sessions.remove(&host);
            tracing::info!(%host, "agent session ended");
            if !me.closing.load(std::sync::atomic::Ordering::SeqCst) {
                me.host_gone(&host).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl Controller {
    /// Send `host` its state, then deltas as the chassis changes; take its
    /// acks and reports until the stream ends.
    async fn serve_session(
        &self,
        host: &str,
        module: u32,
        mut inbound: Streaming<api::AgentMessage>,
        tx: mpsc::Sender<Result<api::ControllerMessage, Status>>,
    ) -> Result<(), Status> {
        let mut changes = self.revision.subscribe();
        let (rev, items) = {
            let st = self.lock();
            (st.chassis.revision(), st.chassis.host_items(host))
        };
        let mut view: BTreeMap<String, u64> =
            items.iter().map(|(k, v)| (k.clone(), hash_of(v))).collect();
        let mut sent = rev;
        self.mutate(false, |c| {
            c.note_desired(host, rev);
            Ok(())
        })?;
        let full = api::ControllerMessage {
            msg: Some(controller_message::Msg::Full(api::HostState {
                revision: rev,
                items: items_of(&items),
                module,
            })),
        };
        if tx.send(Ok(full)).await.is_err() {
            return Ok(());
        }
        // A migration that was activating when the controller stopped
        // continues: the destination gets the source's state again.
        self.resume_activations(host).await;
        let mut chunks = BTreeMap::new();
        loop {
            // Biased: one order of readiness, the agent's messages first
            // (an embedded controller runs the same way each time).
            tokio::select! {
                biased;
                m = inbound.message() => {
                    let Some(m) = m? else { return Ok(()) };
                    match m.msg {
                        Some(agent_message::Msg::Ack(a)) => {
                            self.mutate(false, |c| c.ack(host, a.revision))?;
                            self.prepared(host, a.revision).await;
                            self.released(host, Some(a.revision)).await;
                        }
                        Some(agent_message::Msg::Migration(e)) => {
                            self.migration_event(host, e, &mut chunks).await;
                        }
                        Some(agent_message::Msg::Report(r)) => {
                            let v: Stats = serde_json::from_str(&r.stats_json).map_err(|e| {
                                Status::invalid_argument(format!("report: not a stats document: {e}"))
                            })?;
                            self.lock().reports.insert(host.to_string(), v);
                        }
                        Some(agent_message::Msg::Register(_)) => {
                            return Err(Status::invalid_argument("Register is only the first message of a session"));
                        }
                        None => return Err(Status::invalid_argument("an empty agent message")),
                    }
                }
                r = changes.changed() => {
                    if r.is_err() {
                        return Ok(());
                    }
                    let (rev, items) = {
                        let st = self.lock();
                        (st.chassis.revision(), st.chassis.host_items(host))
                    };
                    let mut upsert = Vec::new();
                    for (k, v) in &items {
                        let h = hash_of(v);
                        if view.get(k) != Some(&h) {
                            view.insert(k.clone(), h);
                            upsert.push(api::Item { key: k.clone(), json: v.to_string() });
                        }
                    }
                    let remove: Vec<String> =
                        view.keys().filter(|k| !items.contains_key(*k)).cloned().collect();
                    for k in &remove {
                        view.remove(k);
                    }
                    if upsert.is_empty() && remove.is_empty() {
                        continue;
                    }
                    self.mutate(false, |c| {
                        c.note_desired(host, rev);
                        Ok(())
                    })?;
                    let delta = api::ControllerMessage {
                        msg: Some(controller_message::Msg::Delta(api::HostDelta {
                            revision: rev,
                            base: sent,
                            upsert,
                            remove,
                        })),
                    };
                    sent = rev;
                    if tx.send(Ok(delta)).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
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
