//! The agent service: a host's session — Register, then its full state and
//! deltas as the chassis changes, its acks, migration events and reports.

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::pin::Pin;

use dvs_migrate::lanes::lanes;
use dvs_proto::api::{self, agent_message, controller_message};
use dvs_proto::desired::Item;
use dvs_proto::stats::Stats;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::auth::cert_names;
use super::{Controller, Outbox, Session};

/// Revisions waiting for a slow agent before the feed waits for it.
const FEED_DEPTH: usize = 16;

/// What one host has been sent, sans-IO: its full state, then deltas from
/// what it last got. The session's driver feeds it the host's items at
/// each revision and sends what it returns.
#[derive(Debug, Default)]
pub struct HostFeed {
    /// A hash of each item's JSON as last sent.
    view: BTreeMap<String, u64>,
    /// The revision last sent.
    sent: u64,
}

impl HostFeed {
    /// The full state: every item at revision `rev`.
    pub fn full(rev: u64, items: &BTreeMap<String, Item>, module: u32) -> (Self, api::HostState) {
        let mut feed = HostFeed {
            view: BTreeMap::new(),
            sent: rev,
        };
        let items = items
            .iter()
            .map(|(k, v)| {
                let json = v.to_json().to_string();
                feed.view.insert(k.clone(), hash_of(&json));
                api::Item {
                    key: k.clone(),
                    json,
                }
            })
            .collect();
        let state = api::HostState {
            revision: rev,
            items,
            module,
        };
        (feed, state)
    }

    /// What changed from what was sent to `items` at revision `rev`: the
    /// items to upsert and the keys to remove, from the revision last sent;
    /// `None` when nothing did (the host's part of the chassis is as sent).
    pub fn delta(&mut self, rev: u64, items: &BTreeMap<String, Item>) -> Option<api::HostDelta> {
        let mut upsert = Vec::new();
        for (k, v) in items {
            let json = v.to_json().to_string();
            let h = hash_of(&json);
            if self.view.get(k) != Some(&h) {
                self.view.insert(k.clone(), h);
                upsert.push(api::Item {
                    key: k.clone(),
                    json,
                });
            }
        }
        let remove: Vec<String> = self
            .view
            .keys()
            .filter(|k| !items.contains_key(*k))
            .cloned()
            .collect();
        for k in &remove {
            self.view.remove(k);
        }
        if upsert.is_empty() && remove.is_empty() {
            return None;
        }
        let base = std::mem::replace(&mut self.sent, rev);
        Some(api::HostDelta {
            revision: rev,
            base,
            upsert,
            remove,
        })
    }
}

fn hash_of(json: &str) -> u64 {
    let mut h = DefaultHasher::new();
    json.hash(&mut h);
    h.finish()
}

/// What an agent's message (after its Register) asks of the controller.
#[derive(Debug)]
pub enum FromAgent {
    /// It runs revision N.
    Ack(u64),
    Migration(api::MigrationEvent),
    Report(Box<Stats>),
}

impl FromAgent {
    /// Read an agent's message.
    ///
    /// # Errors
    /// A second Register, an empty message, a report that is not a stats
    /// document: the session ends with this status.
    pub fn read(m: api::AgentMessage) -> Result<Self, Status> {
        match m.msg {
            Some(agent_message::Msg::Ack(a)) => Ok(Self::Ack(a.revision)),
            Some(agent_message::Msg::Migration(e)) => Ok(Self::Migration(e)),
            Some(agent_message::Msg::Report(r)) => serde_json::from_str(&r.stats_json)
                .map(|s| Self::Report(Box::new(s)))
                .map_err(|e| {
                    Status::invalid_argument(format!("report: not a stats document: {e}"))
                }),
            Some(agent_message::Msg::Register(_)) => Err(Status::invalid_argument(
                "Register is only the first message of a session",
            )),
            None => Err(Status::invalid_argument("an empty agent message")),
        }
    }
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
        let (tx, rx) = lanes();
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
                let _ = tx.urgent(None, Err(s));
            }
            me.lock().sessions.remove(&host);
            tracing::info!(%host, "agent session ended");
            if !me.closing.load(std::sync::atomic::Ordering::SeqCst) {
                me.host_gone(&host).await;
            }
        });
        Ok(Response::new(Box::pin(rx)))
    }
}

impl Controller {
    /// The chassis's revision and `host`'s items in it.
    fn items_of(&self, host: &str) -> (u64, BTreeMap<String, Item>) {
        let st = self.lock();
        (st.chassis.revision(), st.chassis.host_items(host))
    }

    /// `host` has been sent revision `rev` (its convergence is measured
    /// from there).
    fn note_sent(&self, host: &str, rev: u64) -> Result<(), Status> {
        self.mutate(false, |c| {
            c.note_desired(host, rev);
            Ok(())
        })
    }

    /// Send `host` its state, then deltas as the chassis changes; take its
    /// acks and reports until the stream ends.
    async fn serve_session(
        &self,
        host: &str,
        module: u32,
        mut inbound: Streaming<api::AgentMessage>,
        tx: Outbox,
    ) -> Result<(), Status> {
        let mut changes = self.revision.subscribe();
        let (rev, items) = self.items_of(host);
        let (mut feed, full) = HostFeed::full(rev, &items, module);
        self.note_sent(host, rev)?;
        let full = api::ControllerMessage {
            msg: Some(controller_message::Msg::Full(full)),
        };
        if tx.urgent(None, Ok(full)).is_err() {
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
                    match FromAgent::read(m)? {
                        FromAgent::Ack(revision) => {
                            self.mutate(false, |c| c.ack(host, revision))?;
                            self.prepared(host, revision).await;
                            self.released(host, Some(revision)).await;
                            self.recovered(host).await;
                        }
                        FromAgent::Migration(e) => self.migration_event(host, e, &mut chunks).await,
                        FromAgent::Report(stats) => {
                            self.lock().reports.insert(host.to_string(), *stats);
                        }
                    }
                }
                r = changes.changed() => {
                    if r.is_err() {
                        return Ok(());
                    }
                    let (rev, items) = self.items_of(host);
                    let Some(delta) = feed.delta(rev, &items) else { continue };
                    self.note_sent(host, rev)?;
                    let delta = api::ControllerMessage {
                        msg: Some(controller_message::Msg::Delta(delta)),
                    };
                    if tx.urgent(None, Ok(delta)).is_err() {
                        return Ok(());
                    }
                    // A slow agent holds the feed back, not the memory.
                    tx.room(FEED_DEPTH).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(kv: &[Item]) -> BTreeMap<String, Item> {
        kv.iter().map(|i| (i.key(), i.clone())).collect()
    }

    fn profile(name: &str, vlan: u16) -> Item {
        Item::Profile {
            name: name.into(),
            body: serde_json::json!({ "vlan": vlan }),
        }
    }

    #[test]
    fn a_feed_sends_everything_then_only_what_changed() {
        let one = items(&[profile("web", 10), Item::Segments(Vec::new())]);
        let (mut feed, full) = HostFeed::full(3, &one, 2);
        assert_eq!((full.revision, full.module, full.items.len()), (3, 2, 2));
        // A revision that changed nothing of this host's: nothing to send.
        assert!(feed.delta(4, &one).is_none());
        let two = items(&[
            profile("web", 20),
            profile("db", 30),
            Item::TunnelPeers(Vec::new()),
        ]);
        let d = feed.delta(5, &two).unwrap();
        assert_eq!((d.revision, d.base), (5, 3));
        let keys: Vec<&str> = d.upsert.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(keys, ["profile/db", "profile/web", "tunnel_peers"]);
        assert_eq!(d.remove, ["segments"]);
        // The next delta's base is what was last sent.
        let d = feed.delta(7, &items(&[])).unwrap();
        assert_eq!((d.base, d.remove.len()), (5, 3));
    }

    #[test]
    fn agent_messages_are_read_or_refused_with_the_reason() {
        let msg = |m| api::AgentMessage { msg: Some(m) };
        let ack = msg(agent_message::Msg::Ack(api::Ack { revision: 9 }));
        assert!(matches!(FromAgent::read(ack), Ok(FromAgent::Ack(9))));
        let bad = msg(agent_message::Msg::Report(api::Report {
            stats_json: "nope".into(),
        }));
        let e = FromAgent::read(bad).unwrap_err();
        assert!(e.message().contains("not a stats document"), "{e}");
        let again = msg(agent_message::Msg::Register(api::Register::default()));
        assert!(FromAgent::read(again)
            .unwrap_err()
            .message()
            .contains("only the first"));
        let e = FromAgent::read(api::AgentMessage { msg: None }).unwrap_err();
        assert!(e.message().contains("empty"), "{e}");
    }
}
