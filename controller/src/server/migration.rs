//! The controller's side of live migrations: the admin calls (start,
//! activate, abort, list), the hosts' migration events, and sending what
//! the chassis orders for each step of the protocol
//! (`dvs_migrate::protocol`) — commands to the source and the destination
//! over their sessions; the chassis does the desired-state part (standby
//! items, the binding's move) and is the one place the outputs are
//! matched.
//!
//! The source's snapshot passes through the controller, which checks it,
//! keeps it durably until the destination runs from it (so that a
//! restarted controller can finish an activation), and sends it on in
//! chunks.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dvs_migrate::protocol::{Frames, Input, Phase, Trigger};
use dvs_proto::api::{self, controller_message, migration_command::Op, migration_event::Kind};
use dvs_proto::PortId;
use tonic::Status;

use super::admin::{attach, parse_port};
use super::Controller;
use crate::chassis::{Attach, MigrationRec, Order};
use crate::store::Kept;

/// Snapshots travel to the destination in pieces of this size.
/// A destination that has not installed the port by then: aborted.
pub const PREPARE_TIMEOUT: Duration = Duration::from_secs(15);
/// A destination whose port has not found its interface by then (after
/// the migration began): aborted. A VMM makes the interface before the
/// incoming VM can arrive: libvirt creates it right after `migrate begin`.
pub const INTERFACE_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest snapshot a source may send (the format's own bound).
const MAX_SNAPSHOT: usize = dvs_migrate::snapshot::MAX_PAYLOAD + 64;

/// The wall clock, as migration timelines keep it.
pub fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

fn us(d: Option<Duration>) -> u64 {
    d.map_or(0, |d| d.as_micros() as u64)
}

/// Frame times of an event (microseconds; 0: none).
fn frames(from_vm_us: u64, to_vm_us: u64) -> Frames {
    let at = |us: u64| (us > 0).then(|| Duration::from_micros(us));
    Frames {
        from_vm: at(from_vm_us),
        to_vm: at(to_vm_us),
        to_peer: None,
    }
}

/// A party of a migration that could not be told its part, and why.
#[derive(Debug)]
pub(super) struct Unreachable {
    host: String,
    why: String,
}

impl Unreachable {
    fn of(host: &str, why: String) -> Self {
        Unreachable {
            host: host.to_string(),
            why,
        }
    }
}

/// A migration as the admin service shows it.
pub fn view(r: &MigrationRec) -> api::Migration {
    let t = r.machine.timeline();
    api::Migration {
        id: r.id,
        port: r.port.to_string(),
        vm: r.vm.clone(),
        from: r.from.host.clone(),
        to: r.to.host.clone(),
        phase: api::MigrationPhase::from(r.machine.phase()) as i32,
        begin_us: us(Some(t.begin)),
        policy_ready_us: us(t.policy_ready),
        switchover_us: us(t.switchover),
        trigger: t
            .trigger
            .map_or(api::SwitchoverTrigger::Unspecified, Into::into) as i32,
        last_frame_source_us: us(t.last_frame_at_source),
        first_frame_destination_us: us(t.first_frame_at_destination),
        last_to_vm_source_us: us(t.last_to_vm_at_source),
        first_to_vm_destination_us: us(t.first_to_vm_at_destination),
        interface_ready_us: us(r.interface_ready),
        destination_interface: r.to.attach.dev().to_string(),
        blackout_us: us(t.blackout()),
        first_to_peer_destination_us: us(t.first_to_peer_at_destination),
        destination_started_us: us(r.destination_started),
        done_us: us(t.done),
        aborted_us: us(t.aborted.as_ref().map(|a| a.0)),
        abort_reason: t.aborted.as_ref().map(|a| a.1.clone()).unwrap_or_default(),
        snapshot_bytes: r.snapshot_bytes,
        base_snapshot_bytes: r.base_bytes,
        dropped_frames: r.dropped,
        connections: r.connections,
        flows: r.flows,
    }
}

impl Controller {
    fn record(&self, id: u64) -> Option<MigrationRec> {
        self.lock().chassis.migration(id).cloned()
    }

    /// Send `host` a command on its session: a pre-copy's chunks in the
    /// bulk lane, every other command ahead of them (a switchover of one
    /// migration never waits for another's pre-copy: [`dvs_migrate::lanes`]).
    fn send_command(&self, host: &str, c: api::MigrationCommand) -> Result<(), String> {
        let tx = self.lock().sessions.get(host).map(|s| s.tx.clone());
        let Some(tx) = tx else {
            return Err(format!("host {host} is not connected"));
        };
        let (id, pre_copy) = (c.migration, c.op == Op::Presync as i32);
        let m = Ok(api::ControllerMessage {
            msg: Some(controller_message::Msg::Migration(c)),
        });
        if pre_copy {
            tx.bulk(id, m)
        } else {
            tx.urgent(Some(id), m)
        }
        .map_err(|_| format!("host {host}'s session ended"))
    }

    /// Feed migration `id` an input and carry out what follows; a party
    /// that cannot be told aborts the migration.
    ///
    /// # Errors
    /// The input does not fit where the migration is (nothing changed).
    pub(super) async fn input(&self, id: u64, input: Input) -> Result<(), Status> {
        self.input_noting(id, input, |_| {}, None).await
    }

    /// [`Controller::input`]; what the input brought (`note`) and the
    /// source's snapshot (`handover`) are kept in the same transaction.
    async fn input_noting(
        &self,
        id: u64,
        input: Input,
        note: impl FnOnce(&mut MigrationRec) + Send,
        handover: Option<(Kept, &[u8])>,
    ) -> Result<(), Status> {
        let (mut note, mut keep) = (Some(note), handover);
        let mut next = Some(input);
        while let Some(i) = next.take() {
            let (n, h) = (note.take(), keep.take());
            // Durable only what a restarted controller needs (the kept
            // snapshots, with the steps they come with, and aborts): the
            // switchover's other steps stay off the disk's flush, and a
            // restart before the handover is kept aborts anyway.
            let durable = h.is_some() || matches!(i, Input::Abort(_));
            let now = self.now();
            let out = self.mutate_keeping(durable, h.map(|(k, b)| (k, id, b)), |c| {
                let out = c.migration_input(id, i, now)?;
                if let Some(n) = n {
                    c.note_migration(id, n);
                }
                Ok(out)
            })?;
            if let Some(r) = self.record(id) {
                tracing::info!(migration = id, port = %r.port, phase = r.machine.phase().as_str(), ?out, "migration step");
            }
            if let Err(u) = self.perform(id, &out).await {
                // A source that cannot be told may be needed no more (the
                // destination heard the VM); a destination that forwards
                // the port already is waited for; anyone else is needed.
                let r = self.record(id);
                let source = r.as_ref().is_some_and(|r| r.from.host == u.host);
                if r.is_some_and(|r| r.to.host == u.host && r.destination_started.is_some()) {
                    self.await_destination(id, &u.why)?;
                    continue;
                }
                next = Some(if source {
                    Input::SourceLost(u.why)
                } else {
                    Input::Abort(u.why)
                });
            }
        }
        Ok(())
    }

    /// Send what the chassis ordered for migration `id`. An error names
    /// the party that cannot be told.
    async fn perform(&self, id: u64, orders: &[Order]) -> Result<(), Unreachable> {
        for o in orders {
            match o {
                Order::Command {
                    host,
                    command,
                    best_effort,
                } => {
                    let r = self.send_command(host, command.clone());
                    if !best_effort {
                        r.map_err(|why| Unreachable::of(host, why))?;
                    }
                }
                Order::Handover {
                    host,
                    command,
                    kept,
                } => {
                    let bytes = self
                        .kept(*kept, id)
                        .and_then(|b| b.ok_or_else(|| "the source's snapshot is not kept".into()))
                        .map_err(|why| Unreachable::of(host, why))?;
                    self.send_chunks(host, command, &bytes)
                        .map_err(|why| Unreachable::of(host, why))?;
                }
            }
        }
        Ok(())
    }

    fn kept(&self, kept: Kept, id: u64) -> Result<Option<Vec<u8>>, String> {
        self.lock().store.kept(kept, id).map_err(|e| e.to_string())
    }

    /// Send `bytes` (a snapshot) to `host` in chunks, each a `command`.
    fn send_chunks(
        &self,
        host: &str,
        command: &api::MigrationCommand,
        bytes: &[u8],
    ) -> Result<(), String> {
        for (chunk, more) in dvs_migrate::snapshot::pieces(bytes) {
            let c = api::MigrationCommand {
                chunk: chunk.to_vec(),
                more,
                ..command.clone()
            };
            self.send_command(host, c)?;
        }
        Ok(())
    }

    /// The migration a reference names: its ID, or its port's migration.
    fn resolve(&self, r: &api::MigrationRef) -> Result<u64, Status> {
        if r.id != 0 {
            return Ok(r.id);
        }
        if r.port.is_empty() {
            return Err(Status::invalid_argument(
                "name the migration (--id) or its port (--port)",
            ));
        }
        let port = parse_port(&r.port)?;
        let st = self.lock();
        if st.chassis.port(port).is_none() {
            return Err(Status::not_found(format!("no port {port}")));
        }
        st.chassis
            .port_migration(port)
            .ok_or_else(|| Status::not_found(format!("port {port} is not migrating")))
    }

    fn migration_view(&self, id: u64) -> Result<api::Migration, Status> {
        self.record(id).map(|r| view(&r)).ok_or_else(|| {
            Status::not_found(format!("no migration {id}: `dvs migrate list` shows them"))
        })
    }

    pub(super) async fn begin(
        &self,
        r: api::StartMigrationRequest,
    ) -> Result<api::Migration, Status> {
        let port = parse_port(&r.port)?;
        let a = if r.tap.is_empty() && r.netdev.is_empty() && !r.netdev_later {
            None
        } else {
            Some(attach(&r.tap, &r.netdev, r.netdev_later)?)
        };
        {
            let st = self.lock();
            let known = st
                .chassis
                .host(&r.to)
                .is_some_and(|h| h.tunnel_ip.is_some());
            if known && !st.sessions.contains_key(&r.to) {
                return Err(Status::failed_precondition(format!(
                    "host {} is not connected: its agent must run to take the port",
                    r.to
                )));
            }
        }
        let now = self.now();
        let (id, out) = self.mutate(true, |c| c.begin_migration(port, &r.to, a, now))?;
        tracing::info!(migration = id, %port, to = %r.to, "migration begins");
        if let Err(u) = self.perform(id, &out).await {
            self.input(id, Input::Abort(u.why)).await?;
        }
        self.migration_view(id)
    }

    pub(super) async fn activate(&self, r: api::MigrationRef) -> Result<api::Migration, Status> {
        let id = self.resolve(&r)?;
        self.input(id, Input::Resumed(Trigger::VmmResumed)).await?;
        self.migration_view(id)
    }

    pub(super) async fn abort(&self, r: api::MigrationRef) -> Result<api::Migration, Status> {
        let id = self.resolve(&r)?;
        let reason = if r.reason.is_empty() {
            "aborted by request".to_string()
        } else {
            r.reason
        };
        self.input(id, Input::Abort(reason)).await?;
        self.migration_view(id)
    }

    pub(super) fn migration_list(&self) -> api::MigrationList {
        api::MigrationList {
            migrations: self.lock().chassis.migrations().map(view).collect(),
        }
    }

    /// Aborted migrations whose destination `host` has dropped the port
    /// (acknowledged `revision`; `None`: it left): their source resumes.
    pub(super) async fn released(&self, host: &str, revision: Option<u64>) {
        let ready: Vec<MigrationRec> = self
            .lock()
            .chassis
            .migrations()
            .filter(|m| {
                m.to.host == host
                    && m.resume_after
                        .is_some_and(|r| revision.is_none_or(|acked| acked >= r))
            })
            .cloned()
            .collect();
        for m in ready {
            tracing::info!(migration = m.id, source = %m.from.host, "the destination dropped the port: the source resumes");
            let _ = self.send_command(&m.from.host, m.command(Op::Resume));
            let _ = self.mutate(true, |c| {
                c.note_migration(m.id, |r| r.resume_after = None);
                Ok(())
            });
        }
    }

    /// `host` acked `revision`: destinations waiting for it have their port.
    pub(super) async fn prepared(&self, host: &str, revision: u64) {
        let ready: Vec<u64> = self
            .lock()
            .chassis
            .migrations()
            .filter(|m| {
                m.machine.phase() == Phase::Preparing
                    && m.to.host == host
                    && m.prepare_revision <= revision
            })
            .map(|m| m.id)
            .collect();
        for id in ready {
            let _ = self.input(id, Input::Prepared).await;
        }
    }

    /// What a host said about a migration. Events from the wrong host, or
    /// that do not fit, are logged and change nothing.
    pub(super) async fn migration_event(
        &self,
        host: &str,
        e: api::MigrationEvent,
        chunks: &mut BTreeMap<(u64, i32), Vec<u8>>,
    ) {
        let kind = Kind::try_from(e.kind).unwrap_or(Kind::Unspecified);
        let mut id = e.migration;
        if id == 0 && kind == Kind::Wakeup {
            // A standby port without its migration's number: find it.
            if let Ok(p) = e.port.parse::<PortId>() {
                id = self.lock().chassis.port_migration(p).unwrap_or(0);
            }
        }
        let Some(r) = self.record(id) else {
            tracing::debug!(%host, migration = id, ?kind, "event for no migration ignored");
            return;
        };
        let (source, destination) = (r.from.host == host, r.to.host == host);
        let result = match kind {
            Kind::Wakeup if destination => self.wakeup(&r, &e).await,
            Kind::Attached if destination => {
                let at = Duration::from_micros(e.at_us);
                tracing::info!(migration = id, %host, device = %e.device, "the destination's port has its interface");
                self.mutate(true, |c| {
                    c.note_migration(id, |m| {
                        m.interface_ready.get_or_insert(at);
                    });
                    Ok(())
                })
                .map(drop)
            }
            Kind::Stopped | Kind::Synced if source => {
                let key = (id, e.kind);
                let buf = chunks.entry(key).or_default();
                buf.extend_from_slice(&e.chunk);
                if buf.len() > MAX_SNAPSHOT {
                    chunks.remove(&key);
                    let why = format!("host {host} sent a snapshot over the bound");
                    self.input(id, Input::Abort(why)).await
                } else if e.more {
                    Ok(())
                } else {
                    let bytes = chunks.remove(&key).unwrap_or_default();
                    if kind == Kind::Synced {
                        self.presync(&r, bytes).await
                    } else {
                        self.handover(&r, bytes, &e).await
                    }
                }
            }
            Kind::Started if destination => {
                let dropped = e.dropped;
                let activated = Input::Activated { first_frame: None };
                self.input_noting(id, activated, move |m| m.dropped = dropped, None)
                    .await
            }
            Kind::FirstForwarded if destination => {
                let mut at = frames(e.at_us, e.at_to_vm_us);
                at.to_peer = (e.to_peer_us > 0).then(|| Duration::from_micros(e.to_peer_us));
                self.input(id, Input::FirstFrameForwarded { at }).await
            }
            Kind::Failed if source || destination => {
                let why = format!("host {host}: {}", e.error);
                self.input(id, Input::Abort(why)).await
            }
            _ => {
                tracing::warn!(%host, migration = id, ?kind, "migration event from the wrong host ignored");
                Ok(())
            }
        };
        if let Err(s) = result {
            tracing::warn!(%host, migration = id, ?kind, error = %s.message(), "migration event refused");
        }
    }

    /// The destination says the VM runs there — and, when it `started`,
    /// that it forwards from the pre-copy already. After a restart of the
    /// controller this is how the destination tells it started (the
    /// source, which may have resumed, is told to stop again).
    async fn wakeup(&self, r: &MigrationRec, e: &api::MigrationEvent) -> Result<(), Status> {
        let t = if e.nic_read {
            Trigger::NicRead
        } else {
            Trigger::FirstFrame
        };
        self.input(r.id, Input::Resumed(t)).await?;
        if !e.started {
            return Ok(());
        }
        let at = Duration::from_micros(e.at_us);
        let recovering = r.recovering_until.is_some();
        self.input_noting(
            r.id,
            Input::DestinationStarted,
            move |m| {
                m.destination_started.get_or_insert(at);
                m.recovering_until = None;
            },
            None,
        )
        .await?;
        let switching = self
            .record(r.id)
            .is_some_and(|m| m.machine.phase() == Phase::Switching);
        if recovering && switching {
            tracing::info!(migration = r.id, "the destination forwards since before the restart: the source is told to stop again");
            let out = self.mutate(false, |c| {
                Ok(c.carry_out(r.id, &[dvs_migrate::protocol::Output::DeactivateSource]))
            })?;
            if let Err(u) = self.perform(r.id, &out).await {
                self.input(r.id, Input::SourceLost(u.why)).await?;
            }
        }
        Ok(())
    }

    /// Migration `id`'s destination forwards the port already (the VM runs
    /// there) but cannot be told (`why`): the migration waits, up to
    /// [`PREPARE_TIMEOUT`], for it to come back and say so again; then it
    /// goes on (what it was not sent is sent again:
    /// [`Controller::resume_activations`]), and otherwise it is aborted.
    fn await_destination(&self, id: u64, why: &str) -> Result<(), Status> {
        let until = self.now() + PREPARE_TIMEOUT;
        tracing::warn!(
            migration = id,
            reason = why,
            wait_s = PREPARE_TIMEOUT.as_secs(),
            "the destination forwards the port but is away: waiting for it"
        );
        self.mutate(false, |c| {
            c.note_migration(id, |m| {
                m.recovering_until.get_or_insert(until);
            });
            Ok(())
        })
    }

    /// Migrations that wait — after a restart of the controller, or after
    /// their destination, which forwarded the port, disconnected — for
    /// their destination `host` to say whether it started the port: its
    /// first acknowledgement came and it did not say so (it would have
    /// said it before) — aborted.
    pub(super) async fn recovered(&self, host: &str) {
        let waiting: Vec<(u64, bool)> = self
            .lock()
            .chassis
            .migrations()
            .filter(|m| m.recovering_until.is_some() && m.to.host == host && !m.finished())
            .map(|m| (m.id, m.destination_started.is_some()))
            .collect();
        for (id, started) in waiting {
            let why = if started {
                format!("host {host} came back without the port it had started")
            } else {
                "the controller restarted before the switchover".to_string()
            };
            let _ = self
                .input_noting(id, Input::Abort(why), |m| m.recovering_until = None, None)
                .await;
        }
    }

    /// The source stopped and sent its state (`last`: its last chunk's
    /// event): check the envelope, keep it with the record that the source
    /// stopped, and have the destination run from it (which reads it).
    async fn handover(
        &self,
        r: &MigrationRec,
        bytes: Vec<u8>,
        last: &api::MigrationEvent,
    ) -> Result<(), Status> {
        if r.machine.phase() != Phase::Switching {
            // Aborted meanwhile: the source was told to resume.
            return Ok(());
        }
        if let Err(e) = dvs_migrate::snapshot::check(&bytes) {
            let why = format!("the source's snapshot: {e}");
            return self.input(r.id, Input::Abort(why)).await;
        }
        let (size, connections, flows) = (bytes.len() as u64, last.connections, last.flows);
        let stopped = Input::SourceDeactivated {
            last_seq: 0,
            last_frame: frames(last.at_us, last.at_to_vm_us),
        };
        self.input_noting(
            r.id,
            stopped,
            move |m| {
                m.snapshot_bytes = size;
                m.connections = connections;
                m.flows = flows;
            },
            Some((Kept::Handover, &bytes)),
        )
        .await
    }

    /// The source's pre-copy: checked and relayed to the destination, which
    /// keeps it for the delta the handover will be.
    async fn presync(&self, r: &MigrationRec, bytes: Vec<u8>) -> Result<(), Status> {
        if !matches!(r.machine.phase(), Phase::Syncing | Phase::Switching) {
            return Ok(());
        }
        if let Err(e) = dvs_migrate::snapshot::check(&bytes) {
            let why = format!("the source's pre-copy: {e}");
            return self.input(r.id, Input::Abort(why)).await;
        }
        if let Err(e) = self.send_chunks(&r.to.host, &r.command(Op::Presync), &bytes) {
            return self.input(r.id, Input::Abort(e)).await;
        }
        let size = bytes.len() as u64;
        let synced = Input::Synced { seq: 0 };
        let keep = Some((Kept::Base, bytes.as_slice()));
        self.input_noting(r.id, synced, move |m| m.base_bytes = size, keep)
            .await
    }

    /// After the controller restarted: activations under way go on when
    /// their destination is back.
    pub(super) async fn resume_activations(&self, host: &str) {
        let open: Vec<u64> = self
            .lock()
            .chassis
            .migrations()
            .filter(|m| m.machine.phase() == Phase::Activating && m.to.host == host)
            .map(|m| m.id)
            .collect();
        for id in open {
            // The pre-copy first (the handover may be a delta of it): the
            // destination may have lost it with its session.
            let base = match (self.kept(Kept::Base, id), self.record(id)) {
                (Ok(Some(b)), Some(r)) => self.send_chunks(&r.to.host, &r.command(Op::Presync), &b),
                (Err(e), _) => Err(e),
                _ => Ok(()),
            };
            let out: Vec<Order> = self.lock().chassis.handover_order(id).into_iter().collect();
            let r = match base {
                Ok(()) => self.perform(id, &out).await.map_err(|u| u.why),
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                let _ = self.input(id, Input::Abort(e)).await;
            }
        }
    }

    /// `host`'s agent went away: migrations that cannot finish without it
    /// are aborted (a source that already stopped is not needed any more).
    pub(super) async fn host_gone(&self, host: &str) {
        let hit: Vec<(u64, Input)> = self
            .lock()
            .chassis
            .migrations()
            .filter(|m| !m.finished())
            .filter_map(|m| {
                let before_stop = matches!(
                    m.machine.phase(),
                    Phase::Preparing | Phase::Syncing | Phase::Switching
                );
                if m.to.host == host && m.destination_started.is_some() {
                    // It forwards the port (the VM runs there): it is
                    // waited for, not aborted.
                    None
                } else if m.to.host == host {
                    let why = format!("the destination host {host} disconnected");
                    Some((m.id, Input::Abort(why)))
                } else if m.from.host == host && before_stop {
                    // Not needed any more if the destination heard the VM:
                    // it keeps the pre-copy's state.
                    let why = format!("the source host {host} disconnected");
                    Some((m.id, Input::SourceLost(why)))
                } else {
                    None
                }
            })
            .collect();
        for (id, input) in hit {
            if let Err(s) = self.input(id, input).await {
                tracing::warn!(migration = id, error = %s.message(), "abort refused");
            }
        }
        let forwarding: Vec<u64> = self
            .lock()
            .chassis
            .migrations()
            .filter(|m| !m.finished() && m.to.host == host && m.destination_started.is_some())
            .map(|m| m.id)
            .collect();
        for id in forwarding {
            let why = format!("the destination host {host} disconnected");
            if let Err(s) = self.await_destination(id, &why) {
                tracing::warn!(migration = id, error = %s.message(), "cannot wait for the destination");
            }
        }
        // A destination that left cannot hold its port against the source.
        self.released(host, None).await;
    }

    /// Every second, [`Controller::expire_migrations`]; ends when the
    /// controller is dropped.
    pub(super) async fn migration_timer(self) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            if std::sync::Arc::strong_count(&self.state) <= 1 {
                return;
            }
            self.expire_migrations().await;
        }
    }

    /// Abort migrations whose destination never installed the port, or
    /// whose port there never found its interface. The server runs this
    /// every second; an embedded controller (the lab) calls it on its own
    /// clock.
    pub async fn expire_migrations(&self) {
        let now = self.now();
        let wait = self.interface_timeout;
        let late: Vec<(u64, String)> = self
            .lock()
            .chassis
            .migrations()
            .filter_map(|m| {
                let age = now.saturating_sub(m.machine.timeline().begin);
                let host = &m.to.host;
                if m.recovering_until.is_some_and(|t| now > t) && !m.finished() {
                    let secs = PREPARE_TIMEOUT.as_secs();
                    return Some((
                        m.id,
                        if m.destination_started.is_some() {
                            format!("host {host} started the port, then disconnected, and did not come back within {secs} s")
                        } else {
                            format!("the controller restarted before the switchover and host {host} did not say within {secs} s whether it started the port")
                        },
                    ));
                }
                match m.machine.phase() {
                    Phase::Preparing if age > PREPARE_TIMEOUT => Some(format!(
                        "host {host} did not install the port within {} s (see its agent's log)",
                        PREPARE_TIMEOUT.as_secs()
                    )),
                    Phase::Syncing
                        if age > wait
                            && m.interface_ready.is_none()
                            && !matches!(m.to.attach, Attach::Tap(_)) =>
                    {
                        Some(match m.to.attach.dev() {
                            "" => format!(
                                "host {host}: the VMM did not name the port's interface within {} s",
                                wait.as_secs()
                            ),
                            dev => format!(
                                "host {host}: interface `{dev}` did not appear within {} s",
                                wait.as_secs()
                            ),
                        })
                    }
                    _ => None,
                }
                .map(|why| (m.id, why))
            })
            .collect();
        for (id, why) in late {
            let _ = self.input(id, Input::Abort(why)).await;
        }
    }
}
