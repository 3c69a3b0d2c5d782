//! The agent's core, sans-IO: one host's datapath and what the controller
//! wants of it, run by `dvs agent` on real ports and by the lab on
//! in-memory ones — the very same code.
//!
//! In: the controller's messages (a full desired state, deltas, migration
//! commands), the time (`now` on the datapath's clock, `wall` since the
//! Unix epoch for what the controller compares across hosts), and the
//! driver's attachment news (through the [`Attacher`]). Out: [`Outbound`]s
//! — acks, migration events, stats reports, and the desired state to save
//! for a headless restart — taken with [`AgentCore::take_outbound`]. The
//! core reads no clock, opens no socket and never waits: ports are opened
//! by the `open` function its caller passes.
//!
//! Per desired state (full after a (re)connection, or a delta on the last
//! one): the items are put together into an agent file and checked whole
//! with the code of `dvs agent --config` ([`desired_config`]); what differs
//! is applied ([`apply_with`]); each port's mode follows it
//! ([`Migrations::follow_items`], with `resync` on a full state); the state
//! is saved, then acknowledged if it all runs.

use std::collections::BTreeMap;
use std::time::Duration;

use dvs_proto::api::{self, agent_message, controller_message};
use dvs_proto::desired::Item;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::agent::config::{assemble, AgentConfig, PortSpec};
use crate::agent::migration::{self, Inbox, Migrations};
use crate::agent::{apply_with, attached_events};
use crate::driver::attach::{Attacher, Device};
use crate::driver::datapath::Datapath;
use crate::driver::port::PortIo;
use crate::Error;

/// How often the host's counters go to the controller.
pub const REPORT_EVERY: Duration = Duration::from_secs(2);

/// The controller's desired state for this host, as last received: its
/// revision and its items by key (saved as key → the item's JSON).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Desired {
    pub revision: u64,
    #[serde(with = "dvs_proto::desired::items_json")]
    pub items: BTreeMap<String, Item>,
}

/// What the core has for the world outside, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Outbound {
    /// A message for the controller.
    Send(agent_message::Msg),
    /// The desired state that now runs (whole or in part): to be saved
    /// before anything after it is sent.
    Save(Desired),
}

/// The agent file a desired state makes for `host`, with the host's own
/// settings (`tunnel`, `stats_file`, …) in `local`, checked whole.
///
/// # Errors
/// What does not validate, as `dvs agent --config` says it.
pub fn desired_config(
    host: &str,
    items: &BTreeMap<String, Item>,
    local: &Value,
) -> Result<AgentConfig, String> {
    AgentConfig::parse(&assemble(host, items, local).to_string())
}

/// One host's agent: its datapath and the state the controller wants.
#[derive(Debug)]
pub struct AgentCore<P> {
    /// The datapath: the driver polls its ports and uplink.
    pub dp: Datapath<P>,
    cfg: AgentConfig,
    /// The host's own settings the controller's items are put together with.
    local: Value,
    desired: Desired,
    /// The revision that runs whole (0: none yet).
    applied: u64,
    migrations: Migrations,
    inbox: Inbox,
    out: Vec<Outbound>,
    next_report: Duration,
    /// Ports came or went since [`AgentCore::take_changed`].
    changed: bool,
}

impl<P: PortIo + Device> AgentCore<P> {
    /// The core of a datapath built from `cfg` (what `desired` made, or a
    /// static file); `epoch` is the wall-clock time of the datapath
    /// clock's zero.
    pub fn new(
        dp: Datapath<P>,
        cfg: AgentConfig,
        local: Value,
        desired: Desired,
        epoch: Duration,
    ) -> Self {
        AgentCore {
            dp,
            cfg,
            local,
            desired,
            applied: 0,
            migrations: Migrations::new(epoch),
            inbox: Inbox::default(),
            out: Vec::new(),
            next_report: Duration::ZERO,
            changed: false,
        }
    }

    /// What runs.
    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    /// The datapath and what runs on it, for the driver (which polls the
    /// one and reconciles ports' devices with the other).
    pub fn parts(&mut self) -> (&mut Datapath<P>, &AgentConfig) {
        (&mut self.dp, &self.cfg)
    }

    /// The controller revision that runs whole (0: none yet).
    pub fn revision(&self) -> u64 {
        self.applied
    }

    /// The desired state as last received.
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// Whether ports came or went (the driver's fds changed) since the
    /// last call.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// What is to be sent or saved, in order.
    pub fn take_outbound(&mut self) -> Vec<Outbound> {
        std::mem::take(&mut self.out)
    }

    /// Take a message from the controller.
    pub fn on_controller(
        &mut self,
        m: api::ControllerMessage,
        now: Duration,
        attacher: &mut Attacher,
        open: impl FnMut(&PortSpec) -> Result<P, Error>,
    ) {
        let (revision, items, resync) = match m.msg {
            Some(controller_message::Msg::Full(f)) => {
                let upsert = f.items.into_iter().map(|i| (i.key, i.json));
                match with_items(BTreeMap::new(), upsert, Vec::new()) {
                    Ok(items) => (f.revision, items, true),
                    Err(e) => return refuse(f.revision, &e),
                }
            }
            Some(controller_message::Msg::Delta(d)) => {
                let upsert = d.upsert.into_iter().map(|i| (i.key, i.json));
                match with_items(self.desired.items.clone(), upsert, d.remove) {
                    Ok(items) => (d.revision, items, false),
                    Err(e) => return refuse(d.revision, &e),
                }
            }
            Some(controller_message::Msg::Migration(c)) => {
                let events = self.migrations.carry_out(
                    &mut self.dp,
                    &self.cfg.ports,
                    &mut self.inbox,
                    &c,
                    now,
                );
                self.out.extend(
                    events
                        .into_iter()
                        .map(|e| Outbound::Send(agent_message::Msg::Migration(e))),
                );
                // The port's counters changed hands (a start continues the
                // source's): the controller's views get them with the next
                // tick, not up to REPORT_EVERY later from a report made
                // while the port was in standby.
                self.next_report = Duration::ZERO;
                return;
            }
            None => return,
        };
        let new = match desired_config(&self.cfg.host, &items, &self.local) {
            Ok(c) => c,
            Err(e) => return refuse(revision, &format!("does not validate here: {e}")),
        };
        let old = self.cfg.clone();
        let r = apply_with(&mut self.dp, &mut self.cfg, new, now, attacher, open);
        self.migrations
            .follow_items(&mut self.dp, &old, &self.cfg, resync, now);
        if resync {
            // A controller that restarted may not know these ports forward:
            // told again before the state is acknowledged.
            let again = self.migrations.early_starts().into_iter();
            self.out.extend(
                again.map(|e| Outbound::Send(agent_message::Msg::Migration(migration::report(e)))),
            );
        }
        self.changed = true;
        // Applied or not, this is what the datapath now works from.
        self.desired = Desired { revision, items };
        self.out.push(Outbound::Save(self.desired.clone()));
        match r {
            Ok(()) => {
                self.applied = revision;
                self.out
                    .push(Outbound::Send(agent_message::Msg::Ack(api::Ack {
                        revision,
                    })));
            }
            Err(e) => tracing::error!(revision, error = %e, "revision applied in part"),
        }
    }

    /// Apply a new static file (`dvs agent --config` on SIGHUP): what
    /// differs changes.
    ///
    /// # Errors
    /// What could not be applied, one item per problem (the rest is).
    pub fn apply_file(
        &mut self,
        new: AgentConfig,
        now: Duration,
        attacher: &mut Attacher,
        open: impl FnMut(&PortSpec) -> Result<P, Error>,
    ) -> Result<(), String> {
        self.changed = true;
        apply_with(&mut self.dp, &mut self.cfg, new, now, attacher, open)
    }

    /// Time passes: stopped sources' redirects expire, the datapath's
    /// migration events and the ports just attached are reported, and
    /// every [`REPORT_EVERY`] the counters.
    pub fn tick(&mut self, now: Duration, wall: Duration, attacher: &mut Attacher) {
        self.migrations.expire(&mut self.dp, &self.cfg, now);
        let read = attacher.take_read();
        let events = self
            .migrations
            .events(&mut self.dp, &self.cfg.ports, &self.inbox, &read, now)
            .into_iter()
            .chain(attached_events(
                &self.dp,
                &self.cfg.ports,
                attacher.take_attached(),
                wall,
            ))
            .map(|e| Outbound::Send(agent_message::Msg::Migration(migration::report(e))));
        self.out.extend(events);
        if now >= self.next_report {
            self.next_report = now + REPORT_EVERY;
            match serde_json::to_string(&self.dp.stats(&self.cfg.host, now)) {
                Ok(stats_json) => {
                    self.out
                        .push(Outbound::Send(agent_message::Msg::Report(api::Report {
                            stats_json,
                        })))
                }
                Err(e) => tracing::warn!(error = %e, "cannot encode the stats"),
            }
        }
    }
}

/// `items` with `upsert` (JSON text by key) put in and `remove` taken out.
/// `items` with what a state or delta upserts and removes; an item that
/// does not read refuses all of it.
fn with_items(
    mut items: BTreeMap<String, Item>,
    upsert: impl Iterator<Item = (String, String)>,
    remove: Vec<String>,
) -> Result<BTreeMap<String, Item>, String> {
    for (key, json) in upsert {
        let item = Item::parse(&key, &json).map_err(|e| format!("from the controller: {e}"))?;
        items.insert(key, item);
    }
    for k in remove {
        items.remove(&k);
    }
    Ok(items)
}

fn refuse(revision: u64, why: &str) {
    tracing::error!(
        revision,
        error = why,
        "the controller's state is not applied"
    );
}
