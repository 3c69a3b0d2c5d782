//! Migrations in the chassis: their records, and what each step of the
//! protocol (`dvs_migrate::protocol`) does to the hosts' desired state —
//! the destination gets the port in standby when the migration begins, the
//! source's item says standby once it stopped, the binding moves (and with
//! it the VM's location on every host) when the destination forwards, and
//! an abort takes the destination's port away.

use std::time::Duration;

use dvs_migrate::protocol::{Input, Migration, Output, Phase};
use dvs_proto::api::{self, migration_command::Op};
use dvs_proto::PortId;
use serde::{Deserialize, Serialize};

use super::{Attach, Binding, Chassis, Moving};
use crate::store::Kept;
use crate::Error;
use dvs_proto::known_names;

/// A migration, as kept (it outlives the controller's restarts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationRec {
    pub id: u64,
    pub port: PortId,
    pub vm: String,
    pub from: Binding,
    pub to: Binding,
    pub machine: Migration,
    /// The source's pre-copy (whole) while it still forwarded.
    #[serde(default)]
    pub base_bytes: u64,
    /// What the source handed over when it stopped (a delta of the
    /// pre-copy when there was one).
    #[serde(default)]
    pub snapshot_bytes: u64,
    #[serde(default)]
    pub connections: u64,
    #[serde(default)]
    pub flows: u64,
    /// Frames the destination's standby port dropped before it forwarded.
    #[serde(default)]
    pub dropped: u64,
    /// The revision that gave the destination its standby port: its ack
    /// of it means the port is in place with its policy.
    #[serde(default)]
    pub prepare_revision: u64,
    /// Aborted while activating: the source resumes once the destination
    /// acknowledged this revision (its port gone) or left.
    #[serde(default)]
    pub resume_after: Option<u64>,
    /// When the destination's standby port had its interface (wall clock).
    #[serde(default)]
    pub interface_ready: Option<Duration>,
    /// When the destination started the port from the pre-copy on its
    /// own, having heard the VM (wall clock).
    #[serde(default)]
    pub destination_started: Option<Duration>,
    /// The source was lost before its handover: the destination runs from
    /// the pre-copy (the kept snapshot it is sent).
    #[serde(default)]
    pub without_handover: bool,
    /// After a restart of the controller, or after a destination that
    /// forwards the port already disconnected: the migration waits until
    /// then for its destination to say whether it started the port (it
    /// goes on if so, and is aborted otherwise).
    #[serde(default)]
    pub recovering_until: Option<Duration>,
}

impl MigrationRec {
    /// Over, one way or the other.
    pub fn finished(&self) -> bool {
        matches!(self.machine.phase(), Phase::Done | Phase::Aborted)
    }

    /// Its command `op` (to whichever end).
    pub fn command(&self, op: Op) -> api::MigrationCommand {
        api::MigrationCommand {
            migration: self.id,
            port: self.port.to_string(),
            op: op as i32,
            ..api::MigrationCommand::default()
        }
    }
}

/// What the controller sends to carry out a migration's step. The chassis
/// does the desired-state part of each protocol output itself (standby
/// items, the binding's move, the destination's cleanup) and turns the
/// rest into these: the one place the outputs are matched.
#[derive(Debug, Clone, PartialEq)]
pub enum Order {
    /// Send `host` `command`; `best_effort`: a host that cannot be told
    /// does not abort the migration.
    Command {
        host: String,
        command: api::MigrationCommand,
        best_effort: bool,
    },
    /// Send `host` a kept snapshot (the source's handover, or the
    /// pre-copy when the source was lost) in chunks, each a `command`
    /// (START).
    Handover {
        host: String,
        command: api::MigrationCommand,
        kept: Kept,
    },
}

impl Chassis {
    pub fn migrations(&self) -> impl Iterator<Item = &MigrationRec> {
        self.migrations.values()
    }

    pub fn migration(&self, id: u64) -> Option<&MigrationRec> {
        self.migrations.get(&id)
    }

    /// The migration port `id` is in, if any.
    pub fn port_migration(&self, id: PortId) -> Option<u64> {
        Some(self.ports.get(&id.number())?.moving.as_ref()?.migration)
    }

    pub(super) fn not_moving(&self, id: PortId) -> Result<(), Error> {
        match self.port_migration(id) {
            Some(m) => Err(Error::Conflict(format!(
                "port {id} is migrating (migration {m}): abort the migration or let it finish first"
            ))),
            None => Ok(()),
        }
    }

    /// Begin migrating port `port` to host `to` (on interface `attach`,
    /// by default the one it has now); the destination gets the port in
    /// standby with the next revision. Begun again toward the host it is
    /// under way to, it only changes the destination's interface (to
    /// `attach`, when given) and returns the migration with no outputs.
    ///
    /// # Errors
    /// [`Error::NotFound`] for an unknown port or host, [`Error::Conflict`]
    /// for a port that is unbound or migrating already, or an interface
    /// taken on the destination, [`Error::Invalid`] for a port that is on
    /// `to` already.
    pub fn begin_migration(
        &mut self,
        port: PortId,
        to: &str,
        attach: Option<Attach>,
        now: Duration,
    ) -> Result<(u64, Vec<Order>), Error> {
        let p = self.port_rec(port)?;
        if self.hosts.get(to).and_then(|h| h.tunnel_ip).is_none() {
            let known: Vec<&str> = self
                .hosts
                .values()
                .filter(|h| h.tunnel_ip.is_some())
                .map(|h| h.name.as_str())
                .collect();
            return Err(Error::NotFound(if known.is_empty() {
                format!("unknown host `{to}`: no host's agent has registered yet")
            } else {
                format!(
                    "unknown host `{to}`: hosts whose agent registered are {}",
                    known_names(known.into_iter())
                )
            }));
        }
        let Some(from) = p.binding.clone() else {
            return Err(Error::Conflict(format!(
                "port {port} is not bound to a host: bind it (dvs port bind) rather than migrate it"
            )));
        };
        if let Some(m) = p.moving.clone().filter(|m| m.to.host == to) {
            // Under way to this host already: only its interface may change
            // (libvirt names the destination's TAP after `migrate begin`).
            if let Some(a) = attach.filter(|a| *a != m.to.attach) {
                self.free_dev(port, to, &a)?;
                let to = Binding {
                    host: to.to_string(),
                    attach: a,
                };
                if let Some(r) = self.migrations.get_mut(&m.migration) {
                    r.to = to.clone();
                    self.dirty.migrations.insert(m.migration);
                }
                self.set_moving(port, Some(Moving { to, ..m.clone() }));
            }
            return Ok((m.migration, Vec::new()));
        }
        if let Some(m) = &p.moving {
            let phase = self
                .migrations
                .get(&m.migration)
                .map_or("under way", |r| r.machine.phase().as_str());
            return Err(Error::Conflict(format!(
                "port {port} is migrating already (migration {} to {}, {phase}): abort it or let it finish first",
                m.migration, m.to.host
            )));
        }
        self.not_draining(to, "migrate ports to")?;
        if from.host == to {
            return Err(Error::Invalid(format!(
                "port {port} is on host {to} already: migrate it to another host"
            )));
        }
        let attach = attach.unwrap_or_else(|| from.attach.clone());
        self.free_dev(port, to, &attach)?;
        let vm = p.vm.clone();
        let id = self.meta.next_migration;
        self.meta.next_migration += 1;
        let to = Binding {
            host: to.to_string(),
            attach,
        };
        let (machine, out) = Migration::begin(id, now);
        self.set_moving(
            port,
            Some(Moving {
                migration: id,
                to: to.clone(),
                source_stopped: false,
            }),
        );
        self.migrations.insert(
            id,
            MigrationRec {
                id,
                port,
                vm,
                from,
                to,
                machine,
                base_bytes: 0,
                snapshot_bytes: 0,
                connections: 0,
                flows: 0,
                dropped: 0,
                prepare_revision: self.meta.revision,
                resume_after: None,
                interface_ready: None,
                destination_started: None,
                without_handover: false,
                recovering_until: None,
            },
        );
        self.dirty.migrations.insert(id);
        let orders = self.carry_out(id, &out);
        Ok((id, orders))
    }

    fn set_moving(&mut self, port: PortId, moving: Option<Moving>) {
        let n = port.number();
        self.index_remove(n);
        if let Some(p) = self.ports.get_mut(&n) {
            p.moving = moving;
        }
        self.index_add(n);
        self.dirty.ports.insert(n);
        self.bump();
    }

    /// Feed migration `id` what a host or the VMM reported; the chassis
    /// does its part of the outputs and returns what is to be sent
    /// ([`Order`]).
    ///
    /// # Errors
    /// [`Error::NotFound`] for an unknown migration; [`Error::Conflict`]
    /// when the input does not fit where the migration is (nothing changes).
    pub fn migration_input(
        &mut self,
        id: u64,
        input: Input,
        now: Duration,
    ) -> Result<Vec<Order>, Error> {
        let rec = self.migrations.get_mut(&id).ok_or_else(|| {
            Error::NotFound(format!("no migration {id}: `dvs migrate list` shows them"))
        })?;
        let stopped = matches!(input, Input::SourceDeactivated { .. });
        let out = rec
            .machine
            .handle(now, input)
            .map_err(|e| Error::Conflict(e.to_string()))?;
        let port = rec.port;
        self.dirty.migrations.insert(id);
        if stopped {
            if let Some(mut m) = self
                .ports
                .get(&port.number())
                .and_then(|p| p.moving.clone())
            {
                m.source_stopped = true;
                self.set_moving(port, Some(m));
            }
        }
        Ok(self.carry_out(id, &out))
    }

    /// The handover to send migration `id`'s destination again (an
    /// activation the controller's restart cut short).
    pub fn handover_order(&self, id: u64) -> Option<Order> {
        let r = self.migrations.get(&id)?;
        Some(Order::Handover {
            host: r.to.host.clone(),
            command: r.command(Op::Start),
            kept: if r.without_handover {
                Kept::Base
            } else {
                Kept::Handover
            },
        })
    }

    /// Each protocol output of migration `id`: its desired-state part
    /// done here, its commands returned.
    pub(crate) fn carry_out(&mut self, id: u64, out: &[Output]) -> Vec<Order> {
        let Some(r) = self.migrations.get(&id).cloned() else {
            return Vec::new();
        };
        let port = r.port;
        let to_source = |command, best_effort| Order::Command {
            host: r.from.host.clone(),
            command,
            best_effort,
        };
        // A command to the source naming the destination's tunnel address.
        let ip = self.hosts.get(&r.to.host).and_then(|h| h.tunnel_ip);
        let toward = |op| {
            let mut c = r.command(op);
            c.redirect = ip.map(|i| i.to_string()).unwrap_or_default();
            c
        };
        let mut orders = Vec::new();
        for o in out {
            match o {
                // The destination's item (standby) came with the migration.
                Output::PrepareDestination => {}
                // The source may be copying the VM's frames to the
                // destination (since the pre-copy): it stops.
                Output::KeepSource => orders.push(to_source(r.command(Op::Resume), true)),
                Output::CleanDestination => self.set_moving(port, None),
                Output::MoveMac => {
                    let n = port.number();
                    self.index_remove(n);
                    if let Some(p) = self.ports.get_mut(&n) {
                        p.binding = Some(r.to.clone());
                        p.moving = None;
                    }
                    self.index_add(n);
                    self.dirty.ports.insert(n);
                    self.bump();
                }
                Output::DeactivateSource => orders.push(to_source(toward(Op::Stop), false)),
                // A pre-copy while the source still forwards: the handover
                // at the switchover is then only what changed; and frames
                // for the VM go to the destination too from then on.
                Output::StartSync => orders.push(to_source(toward(Op::Sync), false)),
                Output::ActivateDestination { handover, .. } => {
                    if !handover {
                        if let Some(m) = self.migrations.get_mut(&id) {
                            m.without_handover = true;
                        }
                    }
                    orders.extend(self.handover_order(id));
                }
                // Best effort: the VM's own frames announce it too.
                Output::Announce => orders.push(Order::Command {
                    host: r.to.host.clone(),
                    command: r.command(Op::Announce),
                    best_effort: true,
                }),
                Output::ReactivateSource { after_clean } => {
                    if *after_clean {
                        // The destination may have started: the source
                        // takes the port back once the destination has
                        // dropped it (`resume_after`).
                        let revision = self.meta.revision;
                        if let Some(m) = self.migrations.get_mut(&id) {
                            m.resume_after = Some(revision);
                        }
                    } else if r.resume_after.is_none() {
                        // A source that is away restarts the port from its
                        // full state (no standby) when it is back.
                        orders.push(to_source(r.command(Op::Resume), true));
                    }
                }
            }
        }
        orders
    }

    /// Record what a migration's hosts handed over or dropped.
    pub fn note_migration(&mut self, id: u64, f: impl FnOnce(&mut MigrationRec)) {
        if let Some(r) = self.migrations.get_mut(&id) {
            f(r);
            self.dirty.migrations.insert(id);
        }
    }

    /// After a restart of the controller: migrations that were preparing,
    /// or syncing without a pre-copy, are aborted (the source keeps the
    /// port); those with a pre-copy that were syncing or switching wait
    /// until `wait` for their destination to say whether it started the
    /// port from it (it may have heard the VM meanwhile: the migration goes
    /// on; otherwise it is aborted, the source keeping or taking the port
    /// back); those activating go on (the source's state is kept: the
    /// destination gets it again when its agent is back).
    pub fn recover_migrations(&mut self, now: Duration, wait: Duration) -> Vec<(u64, Vec<Order>)> {
        let mut open = Vec::new();
        for r in self.migrations.values_mut() {
            match r.machine.phase() {
                Phase::Syncing | Phase::Switching if r.base_bytes > 0 => {
                    r.recovering_until = Some(now + wait);
                    self.dirty.migrations.insert(r.id);
                }
                Phase::Preparing | Phase::Syncing | Phase::Switching => open.push(r.id),
                _ => {}
            }
        }
        let mut done = Vec::new();
        for id in open {
            let reason = "the controller restarted before the switchover".to_string();
            if let Ok(out) = self.migration_input(id, Input::Abort(reason), now) {
                done.push((id, out));
            }
        }
        done
    }
}
