//! The logical chassis, sans-IO: port profiles and NetFlow monitors
//! (versioned documents), VM ports with IDs that never change, hosts
//! (modules), and what each host must run.
//!
//! Every operation checks everything first and changes nothing when it
//! fails; a successful change bumps the chassis revision and marks what the
//! store must write ([`Chassis::take_dirty`]). Documents are kept as the
//! JSON of what users wrote and validated with the datapath's own types
//! (`dvs_proto::profile`, `dvs_proto::netflow`), so the controller and the
//! agents can never disagree on what a document means.
//!
//! A host's desired state is an agent file (the same schema as `dvs agent
//! --config`), cut into keyed items ([`Chassis::host_items`]) so that a
//! session can send deltas: its ports, the profiles and monitors they use,
//! the VLAN segments (VNI = 10000 + VLAN, peers = the other hosts with ports
//! in the VLAN) and the location of every VM of those VLANs on other hosts.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use dvs_proto::desired::{Item, PortItem, RemoteMac, Segment};
use dvs_proto::netflow::{NetflowMonitor, RawMonitor};
use dvs_proto::profile::{self, Policy, RawProfile};
use dvs_proto::pvlan::{PrivateVlan, PrivateVlans};
use dvs_proto::{known_names, MacAddr, PortId, VlanId};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Error;

mod migration;
pub use migration::{MigrationRec, Order};

/// The largest multi-document file `apply` takes.
pub const MAX_APPLY_BYTES: usize = 1 << 20;
/// VNI of a VLAN's segment.
pub const VNI_BASE: u32 = 10_000;

/// The kinds of document the chassis keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    PortProfile,
    NetflowMonitor,
    PrivateVlan,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::PortProfile, Kind::NetflowMonitor, Kind::PrivateVlan];

    fn label(self) -> &'static str {
        match self {
            Kind::PortProfile => "profile",
            Kind::NetflowMonitor => "monitor",
            Kind::PrivateVlan => "private VLAN",
        }
    }

    /// As documents say it (`kind: PortProfile`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::PortProfile => "PortProfile",
            Kind::NetflowMonitor => "NetflowMonitor",
            Kind::PrivateVlan => "PrivateVlan",
        }
    }

    pub fn from_name(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// A stored document and its version (1 on creation, +1 per change).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Doc {
    pub kind: Kind,
    pub name: String,
    pub version: u64,
    /// The document as applied (JSON of the user's YAML).
    pub body: Value,
}

/// How a port meets its VM on its host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Attach {
    /// A TAP the agent creates.
    Tap(String),
    /// An interface the VMM made.
    Netdev(String),
    /// The VMM's interface, not named yet (libvirt names its TAP after
    /// `prepare begin` and `migrate begin`): the port waits with its policy.
    Unnamed,
}

impl Attach {
    /// The interface's name (empty: not named yet).
    pub fn dev(&self) -> &str {
        match self {
            Attach::Tap(n) | Attach::Netdev(n) => n,
            Attach::Unnamed => "",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    pub host: String,
    pub attach: Attach,
}

/// A VM port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRec {
    pub id: PortId,
    pub vm: String,
    pub mac: MacAddr,
    pub profile: String,
    /// The VM's static IP bindings (`--ip`): IP source guard and ARP/ND
    /// inspection allow them.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    pub binding: Option<Binding>,
    /// Where the port is migrating to, while it does.
    #[serde(default)]
    pub moving: Option<Moving>,
}

/// A port's migration as its hosts must see it: the destination has the
/// port in standby; the source too once it stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Moving {
    pub migration: u64,
    pub to: Binding,
    /// The source said it stopped forwarding.
    pub source_stopped: bool,
}

/// A host (a module of the chassis).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRec {
    pub name: String,
    pub module: u32,
    /// Known once the host's agent registered.
    pub tunnel_ip: Option<IpAddr>,
    /// The last revision the agent said it applied.
    pub acked: u64,
    /// The revision of the last change to what the host must run.
    pub desired: u64,
    /// In maintenance (`dvs host drain`): no port is bound or migrated to
    /// it; its own ports stay until they are moved away.
    #[serde(default)]
    pub draining: bool,
}

/// Counters and numbering kept with the records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub revision: u64,
    pub next_port: u32,
    pub next_module: u32,
    /// v9 source ID / IPFIX observation domain of every host's exports.
    pub chassis_id: u32,
    #[serde(default = "one")]
    pub next_migration: u64,
}

fn one() -> u64 {
    1
}

impl Default for Meta {
    fn default() -> Self {
        Meta {
            revision: 0,
            next_port: 1,
            next_module: 3,
            chassis_id: 1,
            next_migration: 1,
        }
    }
}

/// What changed since the last [`Chassis::take_dirty`]: names and IDs whose
/// records the store must write (or delete, when gone).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dirty {
    pub meta: bool,
    pub docs: BTreeSet<(String, String)>,
    pub ports: BTreeSet<u32>,
    pub hosts: BTreeSet<String>,
    pub migrations: BTreeSet<u64>,
}

impl Dirty {
    pub fn is_empty(&self) -> bool {
        !self.meta
            && self.docs.is_empty()
            && self.ports.is_empty()
            && self.hosts.is_empty()
            && self.migrations.is_empty()
    }
}

/// The chassis state.
#[derive(Debug, Clone, Default)]
pub struct Chassis {
    pub meta: Meta,
    profiles: BTreeMap<String, Doc>,
    monitors: BTreeMap<String, Doc>,
    /// `kind: PrivateVlan` documents.
    pvlan_docs: BTreeMap<String, Doc>,
    ports: BTreeMap<u32, PortRec>,
    hosts: BTreeMap<String, HostRec>,
    migrations: BTreeMap<u64, MigrationRec>,
    /// Each profile resolved (inheritance applied), rebuilt on change.
    resolved: BTreeMap<String, Policy>,
    /// The private VLANs the documents declare, checked together.
    pvlans: PrivateVlans,
    index: Index,
    dirty: Dirty,
}

/// Ports looked up by what operations and host views ask for.
#[derive(Debug, Clone, Default)]
struct Index {
    by_mac: HashMap<MacAddr, u32>,
    /// (host, interface) → port.
    by_dev: HashMap<(String, String), u32>,
    by_host: BTreeMap<String, BTreeSet<u32>>,
    /// Ports whose VM's MAC lives in the VLAN (access, or trunk native).
    mac_vlan: BTreeMap<u16, BTreeSet<u32>>,
    /// Ports that carry the VLAN.
    carried: BTreeMap<u16, BTreeSet<u32>>,
}

/// One line of what an apply or delete did (or would do).
pub type Change = String;

impl Chassis {
    /// A chassis from stored records (checked as a whole).
    ///
    /// # Errors
    /// The stored documents no longer validate (a store written by another
    /// version, or edited by hand).
    pub fn from_records(
        meta: Meta,
        docs: Vec<Doc>,
        ports: Vec<PortRec>,
        hosts: Vec<HostRec>,
        migrations: Vec<MigrationRec>,
    ) -> Result<Self, Error> {
        let mut c = Chassis {
            meta,
            ..Chassis::default()
        };
        for d in docs {
            c.docs_mut(d.kind).insert(d.name.clone(), d);
        }
        c.ports = ports.into_iter().map(|p| (p.id.number(), p)).collect();
        c.hosts = hosts.into_iter().map(|h| (h.name.clone(), h)).collect();
        c.migrations = migrations.into_iter().map(|m| (m.id, m)).collect();
        (c.resolved, c.pvlans) = validate(&c.profiles, &c.monitors, &c.pvlan_docs)?;
        c.reindex();
        Ok(c)
    }

    fn reindex(&mut self) {
        self.index = Index::default();
        let ids: Vec<u32> = self.ports.keys().copied().collect();
        for id in ids {
            self.index_add(id);
        }
    }

    fn index_add(&mut self, id: u32) {
        let Some(p) = self.ports.get(&id) else { return };
        let (mac_vlan, carried) = (self.port_vlan(p), self.port_vlans(p));
        let ix = &mut self.index;
        ix.by_mac.insert(p.mac, id);
        for b in p.binding.iter().chain(p.moving.as_ref().map(|m| &m.to)) {
            if b.attach != Attach::Unnamed {
                ix.by_dev
                    .insert((b.host.clone(), b.attach.dev().to_string()), id);
            }
            ix.by_host.entry(b.host.clone()).or_default().insert(id);
        }
        if let Some(v) = mac_vlan {
            ix.mac_vlan.entry(v).or_default().insert(id);
        }
        for v in carried {
            ix.carried.entry(v).or_default().insert(id);
        }
    }

    fn index_remove(&mut self, id: u32) {
        let Some(p) = self.ports.get(&id) else { return };
        let (mac_vlan, carried) = (self.port_vlan(p), self.port_vlans(p));
        let ix = &mut self.index;
        ix.by_mac.remove(&p.mac);
        for b in p.binding.iter().chain(p.moving.as_ref().map(|m| &m.to)) {
            if b.attach != Attach::Unnamed
                && ix.by_dev.get(&(b.host.clone(), b.attach.dev().to_string())) == Some(&id)
            {
                ix.by_dev
                    .remove(&(b.host.clone(), b.attach.dev().to_string()));
            }
            if let Some(s) = ix.by_host.get_mut(&b.host) {
                s.remove(&id);
            }
        }
        if let Some(s) = mac_vlan.and_then(|v| ix.mac_vlan.get_mut(&v)) {
            s.remove(&id);
        }
        for v in carried {
            if let Some(s) = ix.carried.get_mut(&v) {
                s.remove(&id);
            }
        }
    }

    pub fn revision(&self) -> u64 {
        self.meta.revision
    }

    /// What the store must write; cleared.
    pub fn take_dirty(&mut self) -> Dirty {
        std::mem::take(&mut self.dirty)
    }

    pub fn doc(&self, kind: Kind, name: &str) -> Option<&Doc> {
        match kind {
            Kind::PortProfile => self.profiles.get(name),
            Kind::NetflowMonitor => self.monitors.get(name),
            Kind::PrivateVlan => self.pvlan_docs.get(name),
        }
    }

    fn docs_mut(&mut self, kind: Kind) -> &mut BTreeMap<String, Doc> {
        match kind {
            Kind::PortProfile => &mut self.profiles,
            Kind::NetflowMonitor => &mut self.monitors,
            Kind::PrivateVlan => &mut self.pvlan_docs,
        }
    }

    pub fn docs(&self) -> impl Iterator<Item = &Doc> {
        self.profiles
            .values()
            .chain(self.monitors.values())
            .chain(self.pvlan_docs.values())
    }

    /// The chassis's private VLANs.
    pub fn private_vlans(&self) -> &PrivateVlans {
        &self.pvlans
    }

    pub fn port(&self, id: PortId) -> Option<&PortRec> {
        self.ports.get(&id.number())
    }

    pub fn ports(&self) -> impl Iterator<Item = &PortRec> {
        self.ports.values()
    }

    pub fn host(&self, name: &str) -> Option<&HostRec> {
        self.hosts.get(name)
    }

    pub fn hosts(&self) -> impl Iterator<Item = &HostRec> {
        self.hosts.values()
    }

    /// How many ports are bound to `host`.
    pub fn host_port_count(&self, host: &str) -> usize {
        self.index.by_host.get(host).map_or(0, BTreeSet::len)
    }

    /// The resolved policy of profile `name`.
    pub fn policy(&self, name: &str) -> Option<&Policy> {
        self.resolved.get(name)
    }

    fn bump(&mut self) {
        self.meta.revision += 1;
        self.dirty.meta = true;
    }

    /// Apply a multi-document YAML file of `PortProfile`, `NetflowMonitor`
    /// and `PrivateVlan` documents, all or nothing; with `dry_run` only say
    /// what would change.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the document and field at fault: bad YAML,
    /// an unknown kind, a bad field, an unknown parent, a cycle, an unknown
    /// monitor, a port left without a VLAN, private VLANs that overlap or a
    /// profile's VLAN mode they do not allow, a file over 1 MiB.
    pub fn apply(&mut self, yaml: &str, dry_run: bool) -> Result<Vec<Change>, Error> {
        if yaml.len() > MAX_APPLY_BYTES {
            return Err(Error::Invalid(format!(
                "the file has {} bytes: apply at most {MAX_APPLY_BYTES} at once",
                yaml.len()
            )));
        }
        let mut next = [
            self.profiles.clone(),
            self.monitors.clone(),
            self.pvlan_docs.clone(),
        ];
        let mut incoming: Vec<(Kind, String, Value)> = Vec::new();
        for (i, de) in serde_norway::Deserializer::from_str(yaml).enumerate() {
            let at = format!("document {}", i + 1);
            let v = Value::deserialize(de).map_err(|e| Error::Invalid(format!("{at}: {e}")))?;
            if v.is_null() {
                continue;
            }
            let kind = match v.get("kind").and_then(Value::as_str) {
                Some(k) => Kind::from_name(k).ok_or_else(|| {
                    Error::Invalid(format!(
                        "{at}: kind `{k}` is not one this file may hold: expected PortProfile, NetflowMonitor or PrivateVlan"
                    ))
                })?,
                None => {
                    return Err(Error::Invalid(format!(
                        "{at}: no `kind:` — say PortProfile, NetflowMonitor or PrivateVlan"
                    )))
                }
            };
            let name = v
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| !n.trim().is_empty())
                .ok_or_else(|| Error::Invalid(format!("{at}: no `name:`")))?
                .to_string();
            if incoming.iter().any(|(k, n, _)| *k == kind && *n == name) {
                return Err(Error::Invalid(format!(
                    "{at}: {} `{name}` appears twice in the file",
                    kind.label()
                )));
            }
            incoming.push((kind, name, v));
        }
        if incoming.is_empty() {
            return Err(Error::Invalid("the file holds no document".into()));
        }
        let mut changes = Vec::new();
        for (kind, name, body) in incoming {
            let map = &mut next[kind as usize];
            match map.get(&name) {
                Some(d) if d.body == body => {}
                Some(d) => {
                    changes.push(format!(
                        "{} {name}: version {} → {} ({})",
                        kind.label(),
                        d.version,
                        d.version + 1,
                        changed_fields(&d.body, &body).join(", ")
                    ));
                    let version = d.version + 1;
                    map.insert(
                        name.clone(),
                        Doc {
                            kind,
                            name,
                            version,
                            body,
                        },
                    );
                }
                None => {
                    changes.push(format!("{} {name}: created (version 1)", kind.label()));
                    map.insert(
                        name.clone(),
                        Doc {
                            kind,
                            name,
                            version: 1,
                            body,
                        },
                    );
                }
            }
        }
        let [profiles, monitors, pvlan_docs] = next;
        let (resolved, pvlans) = validate(&profiles, &monitors, &pvlan_docs)?;
        for p in self.ports.values() {
            check_port_policy(p, &resolved)?;
        }
        if dry_run || changes.is_empty() {
            return Ok(changes);
        }
        for (kind, docs) in [
            (Kind::PortProfile, &profiles),
            (Kind::NetflowMonitor, &monitors),
            (Kind::PrivateVlan, &pvlan_docs),
        ] {
            for (name, d) in docs {
                if self.doc(kind, name) != Some(d) {
                    self.dirty.docs.insert((kind.name().into(), name.clone()));
                }
            }
        }
        self.profiles = profiles;
        self.monitors = monitors;
        self.pvlan_docs = pvlan_docs;
        self.resolved = resolved;
        self.pvlans = pvlans;
        self.reindex();
        self.bump();
        Ok(changes)
    }

    /// Delete a profile or monitor that nothing uses.
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::Conflict`] naming the ports that take
    /// the profile, the profiles that inherit it or take the monitor.
    pub fn delete_doc(&mut self, kind: Kind, name: &str) -> Result<Vec<Change>, Error> {
        if self.doc(kind, name).is_none() {
            return Err(Error::NotFound(format!(
                "no {} `{name}`; {}s: {}",
                kind.label(),
                kind.label(),
                known_names(
                    self.docs()
                        .filter(|d| d.kind == kind)
                        .map(|d| d.name.as_str())
                )
            )));
        }
        match kind {
            Kind::PortProfile => {
                let users: Vec<String> = self
                    .ports
                    .values()
                    .filter(|p| p.profile == name)
                    .map(|p| p.id.to_string())
                    .collect();
                if !users.is_empty() {
                    return Err(Error::Conflict(format!(
                        "profile `{name}` is in use by port{} {}: give them another profile first",
                        if users.len() > 1 { "s" } else { "" },
                        users.join(", ")
                    )));
                }
                let heirs: Vec<&str> = self
                    .profiles
                    .values()
                    .filter(|d| d.body.get("inherit").and_then(Value::as_str) == Some(name))
                    .map(|d| d.name.as_str())
                    .collect();
                if !heirs.is_empty() {
                    return Err(Error::Conflict(format!(
                        "profile `{name}` is inherited by {}: change them first",
                        heirs.join(", ")
                    )));
                }
                self.profiles.remove(name);
                self.resolved.remove(name);
            }
            Kind::NetflowMonitor => {
                let users: Vec<&str> = self
                    .profiles
                    .values()
                    .filter(|d| {
                        d.body
                            .get("netflow")
                            .and_then(|n| n.get("monitor"))
                            .and_then(Value::as_str)
                            == Some(name)
                    })
                    .map(|d| d.name.as_str())
                    .collect();
                if !users.is_empty() {
                    return Err(Error::Conflict(format!(
                        "monitor `{name}` is taken by profile{} {}: change them first",
                        if users.len() > 1 { "s" } else { "" },
                        users.join(", ")
                    )));
                }
                self.monitors.remove(name);
            }
            Kind::PrivateVlan => {
                let mut rest = self.pvlan_docs.clone();
                rest.remove(name);
                let (_, pvlans) = validate(&self.profiles, &self.monitors, &rest).map_err(|e| {
                    Error::Conflict(format!(
                        "private VLAN `{name}` is in use: {}; change the profiles first",
                        e
                    ))
                })?;
                self.pvlan_docs = rest;
                self.pvlans = pvlans;
                self.reindex();
            }
        }
        self.dirty
            .docs
            .insert((kind.name().into(), name.to_string()));
        self.bump();
        Ok(vec![format!("{} {name}: deleted", kind.label())])
    }

    /// Define a VM port; returns its new ID (never reused).
    ///
    /// # Errors
    /// [`Error::Invalid`] for an empty VM name or a bad MAC, [`Error::NotFound`]
    /// for an unknown profile, [`Error::Conflict`] for a MAC another port has.
    pub fn create_port(
        &mut self,
        vm: &str,
        mac: &str,
        profile: &str,
        ips: &[String],
    ) -> Result<PortId, Error> {
        if vm.trim().is_empty() {
            return Err(Error::Invalid("--vm: the VM name is empty".into()));
        }
        let mac: MacAddr = mac
            .parse()
            .map_err(|e: dvs_proto::Error| Error::Invalid(format!("--mac: {e}")))?;
        if mac.is_multicast() || mac.is_zero() {
            return Err(Error::Invalid(format!(
                "--mac: {mac} is not a unicast address a VM can have"
            )));
        }
        if let Some(p) = self
            .index
            .by_mac
            .get(&mac)
            .and_then(|id| self.ports.get(id))
        {
            return Err(Error::Conflict(format!(
                "MAC {mac} belongs to port {} (VM `{}`)",
                p.id, p.vm
            )));
        }
        let id = PortId::new(self.meta.next_port)
            .ok_or_else(|| Error::Invalid("the chassis ran out of port IDs".into()))?;
        let rec = PortRec {
            id,
            vm: vm.to_string(),
            mac,
            profile: profile.to_string(),
            ips: parse_ips(ips)?,
            binding: None,
            moving: None,
        };
        self.known_profile(profile)?;
        check_port_policy(&rec, &self.resolved)?;
        self.check_ips(&rec)?;
        self.meta.next_port += 1;
        self.ports.insert(id.number(), rec);
        self.index_add(id.number());
        self.dirty.ports.insert(id.number());
        self.bump();
        Ok(id)
    }

    fn known_profile(&self, profile: &str) -> Result<(), Error> {
        if self.profiles.contains_key(profile) {
            return Ok(());
        }
        Err(Error::NotFound(format!(
            "no profile `{profile}`; profiles: {}",
            known_names(self.profiles.keys().map(String::as_str))
        )))
    }

    /// Change the profile a port takes.
    ///
    /// # Errors
    /// [`Error::NotFound`] for an unknown port or profile.
    pub fn set_port_profile(&mut self, id: PortId, profile: &str) -> Result<(), Error> {
        self.known_profile(profile)?;
        let mut rec = self.port_rec(id)?.clone();
        rec.profile = profile.to_string();
        check_port_policy(&rec, &self.resolved)?;
        self.check_ips(&rec)?;
        self.index_remove(id.number());
        self.ports.insert(id.number(), rec);
        self.index_add(id.number());
        self.dirty.ports.insert(id.number());
        self.bump();
        Ok(())
    }

    /// Set port `id`'s static IP bindings (`ips`; none: it has none).
    ///
    /// # Errors
    /// [`Error::NotFound`] for an unknown port; [`Error::Invalid`] for a
    /// value that is no address a VM can have; [`Error::Conflict`] for an
    /// address another port has on a VLAN this one carries.
    pub fn set_port_ips(&mut self, id: PortId, ips: &[String]) -> Result<(), Error> {
        let mut rec = self.port_rec(id)?.clone();
        rec.ips = parse_ips(ips)?;
        self.check_ips(&rec)?;
        self.ports.insert(id.number(), rec);
        self.dirty.ports.insert(id.number());
        self.bump();
        Ok(())
    }

    /// No address of `rec`'s is another port's on a VLAN both carry (two
    /// VMs of one segment cannot both own it).
    fn check_ips(&self, rec: &PortRec) -> Result<(), Error> {
        if rec.ips.is_empty() {
            return Ok(());
        }
        let mine = self.port_vlans(rec);
        for other in self.ports.values().filter(|o| o.id != rec.id) {
            let Some(ip) = rec.ips.iter().find(|ip| other.ips.contains(ip)) else {
                continue;
            };
            if let Some(v) = self
                .port_vlans(other)
                .into_iter()
                .find(|v| mine.contains(v))
            {
                return Err(Error::Conflict(format!(
                    "--ip {ip}: bound to port {} (VM `{}`) on VLAN {v} already",
                    other.id, other.vm
                )));
            }
        }
        Ok(())
    }

    fn port_rec(&self, id: PortId) -> Result<&PortRec, Error> {
        self.ports
            .get(&id.number())
            .ok_or_else(|| Error::NotFound(format!("no port {id}")))
    }

    /// Put port `id` on `host` (a host not seen yet gets a module number
    /// now; its agent may register later).
    ///
    /// # Errors
    /// [`Error::NotFound`] for an unknown port, [`Error::Invalid`] for a bad
    /// host or interface name, [`Error::Conflict`] when the interface is
    /// another port's on that host.
    pub fn bind_port(&mut self, id: PortId, host: &str, attach: Attach) -> Result<(), Error> {
        let here = self
            .port_rec(id)?
            .binding
            .as_ref()
            .is_some_and(|b| b.host == host);
        self.not_moving(id)?;
        check_host_name(host)?;
        if !here {
            self.not_draining(host, "bind ports to")?;
        }
        self.free_dev(id, host, &attach)?;
        self.ensure_host(host);
        self.index_remove(id.number());
        if let Some(p) = self.ports.get_mut(&id.number()) {
            p.binding = Some(Binding {
                host: host.to_string(),
                attach,
            });
        }
        self.index_add(id.number());
        self.dirty.ports.insert(id.number());
        self.bump();
        Ok(())
    }

    /// Check that `attach` names a valid interface that no port but `id`
    /// has on `host` (an unnamed one is always free).
    ///
    /// # Errors
    /// [`Error::Invalid`] for a bad name, [`Error::Conflict`] for another
    /// port's interface.
    pub(crate) fn free_dev(&self, id: PortId, host: &str, attach: &Attach) -> Result<(), Error> {
        if *attach == Attach::Unnamed {
            return Ok(());
        }
        let dev = attach.dev();
        if dev.is_empty() || dev.len() > 15 || dev.contains(['/', ' ']) {
            return Err(Error::Invalid(format!(
                "interface name `{dev}` is not valid: 1 to 15 characters, no '/' or spaces"
            )));
        }
        if let Some(other) = self
            .index
            .by_dev
            .get(&(host.to_string(), dev.to_string()))
            .filter(|o| **o != id.number())
            .and_then(|o| self.ports.get(o))
        {
            return Err(Error::Conflict(format!(
                "interface `{dev}` on host {host} belongs to port {}: name another (--tap, --netdev)",
                other.id
            )));
        }
        Ok(())
    }

    /// Take port `id` off its host.
    ///
    /// # Errors
    /// [`Error::NotFound`].
    pub fn unbind_port(&mut self, id: PortId) -> Result<(), Error> {
        self.port_rec(id)?;
        self.not_moving(id)?;
        self.index_remove(id.number());
        if let Some(p) = self.ports.get_mut(&id.number()) {
            p.binding = None;
        }
        self.index_add(id.number());
        self.dirty.ports.insert(id.number());
        self.bump();
        Ok(())
    }

    /// Delete port `id` (its ID is never given again).
    ///
    /// # Errors
    /// [`Error::NotFound`].
    pub fn delete_port(&mut self, id: PortId) -> Result<(), Error> {
        self.port_rec(id)?;
        self.not_moving(id)?;
        self.index_remove(id.number());
        self.ports.remove(&id.number());
        self.dirty.ports.insert(id.number());
        self.bump();
        Ok(())
    }

    /// Refuse `what` (a verb phrase) toward a host in maintenance.
    pub(crate) fn not_draining(&self, host: &str, what: &str) -> Result<(), Error> {
        if self.hosts.get(host).is_some_and(|h| h.draining) {
            return Err(Error::Conflict(format!(
                "host {host} is draining (dvs host drain): {what} another host, or end its drain with `dvs host drain {host} --off`"
            )));
        }
        Ok(())
    }

    /// Put `host` in maintenance, or take it out (`drain` false): a
    /// draining host gets no new port, bound or migrated; its own stay
    /// until moved. Returns whether anything changed.
    ///
    /// # Errors
    /// [`Error::NotFound`] for an unknown host.
    pub fn drain_host(&mut self, host: &str, drain: bool) -> Result<bool, Error> {
        let h = self.hosts.get_mut(host).ok_or_else(|| unknown_host(host))?;
        if h.draining == drain {
            return Ok(false);
        }
        h.draining = drain;
        self.dirty.hosts.insert(host.to_string());
        Ok(true)
    }

    /// Forget `host` — only an empty one: no port bound to it, none on its
    /// way there, no migration under way from or to it.
    ///
    /// # Errors
    /// [`Error::NotFound`] for an unknown host, [`Error::Conflict`] naming
    /// what it still has.
    pub fn remove_host(&mut self, host: &str) -> Result<(), Error> {
        if !self.hosts.contains_key(host) {
            return Err(unknown_host(host));
        }
        let mut left: Vec<String> = self
            .index
            .by_host
            .get(host)
            .into_iter()
            .flatten()
            .filter_map(|n| self.ports.get(n))
            .map(|p| p.id.to_string())
            .collect();
        left.extend(
            self.ports
                .values()
                .filter(|p| p.moving.as_ref().is_some_and(|m| m.to.host == host))
                .map(|p| format!("{} (migrating here)", p.id)),
        );
        if !left.is_empty() {
            return Err(Error::Conflict(format!(
                "host {host} still has ports {}: migrate them away or delete them first",
                left.join(", ")
            )));
        }
        let under_way: Vec<String> = self
            .migrations
            .values()
            .filter(|m| !m.finished() && (m.from.host == host || m.to.host == host))
            .map(|m| m.id.to_string())
            .collect();
        if !under_way.is_empty() {
            return Err(Error::Conflict(format!(
                "host {host} is in migrations {} under way: let them end or abort them first",
                under_way.join(", ")
            )));
        }
        self.hosts.remove(host);
        self.dirty.hosts.insert(host.to_string());
        // Other hosts' tunnel peers named it.
        self.bump();
        Ok(())
    }

    fn ensure_host(&mut self, host: &str) -> &mut HostRec {
        if !self.hosts.contains_key(host) {
            let module = self.meta.next_module;
            self.meta.next_module += 1;
            self.dirty.meta = true;
            self.hosts.insert(
                host.to_string(),
                HostRec {
                    name: host.to_string(),
                    module,
                    tunnel_ip: None,
                    acked: 0,
                    desired: 0,
                    draining: false,
                },
            );
        }
        self.dirty.hosts.insert(host.to_string());
        self.hosts
            .get_mut(host)
            .unwrap_or_else(|| unreachable!("inserted above"))
    }

    /// An agent registers: the host gets (or keeps) its module number and
    /// its tunnel address is recorded. Returns the module.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a bad host name, [`Error::Conflict`] when
    /// another host already uses the tunnel address.
    pub fn register(&mut self, host: &str, tunnel_ip: IpAddr) -> Result<u32, Error> {
        check_host_name(host)?;
        if let Some(other) = self
            .hosts
            .values()
            .find(|h| h.name != host && h.tunnel_ip == Some(tunnel_ip))
        {
            return Err(Error::Conflict(format!(
                "tunnel address {tunnel_ip} is host {}'s",
                other.name
            )));
        }
        let changed = self.hosts.get(host).map(|h| h.tunnel_ip) != Some(Some(tunnel_ip));
        let h = self.ensure_host(host);
        h.tunnel_ip = Some(tunnel_ip);
        let module = h.module;
        if changed {
            // Other hosts' segments and MAC locations name this address.
            self.bump();
        }
        Ok(module)
    }

    /// The agent of `host` applied `revision`.
    ///
    /// # Errors
    /// [`Error::NotFound`] for an unknown host, [`Error::Invalid`] for a
    /// revision the chassis has not reached.
    pub fn ack(&mut self, host: &str, revision: u64) -> Result<(), Error> {
        if revision > self.meta.revision {
            return Err(Error::Invalid(format!(
                "ack of revision {revision} from the future: the chassis is at {}",
                self.meta.revision
            )));
        }
        let h = self
            .hosts
            .get_mut(host)
            .ok_or_else(|| Error::NotFound(format!("no host `{host}`")))?;
        if revision > h.acked {
            h.acked = revision;
            self.dirty.hosts.insert(host.to_string());
        }
        Ok(())
    }

    /// Record that what `host` must run last changed at `revision`.
    pub fn note_desired(&mut self, host: &str, revision: u64) {
        if let Some(h) = self.hosts.get_mut(host) {
            if h.desired != revision {
                h.desired = revision;
                self.dirty.hosts.insert(host.to_string());
            }
        }
    }

    /// The VLAN whose MAC table holds port `p`'s VM (access VLAN or trunk
    /// native VLAN).
    pub fn port_vlan(&self, p: &PortRec) -> Option<u16> {
        let mode = self.resolved.get(&p.profile)?.vlan.as_ref()?;
        mode.untagged_vlan().map(VlanId::get)
    }

    /// The VLANs a port's host must have for it: those it carries, and
    /// a pvlan port's whole private VLAN.
    fn port_vlans(&self, p: &PortRec) -> Vec<u16> {
        match self.resolved.get(&p.profile).and_then(|x| x.vlan.as_ref()) {
            Some(mode) => self
                .pvlans
                .vlans_of(mode)
                .into_iter()
                .map(VlanId::get)
                .collect(),
            None => Vec::new(),
        }
    }

    /// What `host` must run, as typed items keyed by [`Item::key`]
    /// (`chassis`, `tunnel_peers`, `segments`, `profile/NAME`,
    /// `monitor/NAME`, `port/vethN`, `mac/VLAN/MAC`); the agent puts them
    /// together into an agent file (`dvs_switch::agent::config::assemble`).
    pub fn host_items(&self, host: &str) -> BTreeMap<String, Item> {
        let mut items = BTreeMap::new();
        let mut add = |i: Item| {
            items.insert(i.key(), i);
        };
        add(Item::Chassis(self.meta.chassis_id));
        if !self.pvlans.is_empty() {
            add(Item::PrivateVlans(self.pvlans.decls().to_vec()));
        }
        // The other hosts' tunnel endpoints: the only sources of VXLAN it
        // takes (a host that leaves a segment may still redirect a
        // migrated VM's frames to it for a moment).
        let others: BTreeSet<IpAddr> = self
            .hosts
            .values()
            .filter(|h| h.name != host)
            .filter_map(|h| h.tunnel_ip)
            .collect();
        add(Item::TunnelPeers(others.into_iter().collect()));
        let mine: Vec<&PortRec> = self
            .index
            .by_host
            .get(host)
            .into_iter()
            .flatten()
            .filter_map(|id| self.ports.get(id))
            .collect();
        for d in self.documents_for(&mine) {
            add(d);
        }
        let mut vlans = BTreeSet::new();
        for p in &mine {
            let Some(b) = &p.binding else { continue };
            add(Item::Port(self.port_item(p, &b.attach, host)));
            vlans.extend(self.port_vlans(p));
        }
        let (peers, macs) = self.remote_of(host, &vlans);
        for m in macs {
            add(Item::RemoteMac(m));
        }
        add(Item::Segments(
            vlans
                .iter()
                .map(|v| Segment {
                    vlan: *v,
                    vni: VNI_BASE + u32::from(*v),
                    peers: peers
                        .get(v)
                        .map(|s| s.iter().copied().collect())
                        .unwrap_or_default(),
                })
                .collect(),
        ));
        items
    }

    /// The profiles `ports` use, with their parents, and the monitors
    /// those use.
    fn documents_for(&self, ports: &[&PortRec]) -> Vec<Item> {
        let mut wanted: Vec<String> = ports.iter().map(|p| p.profile.clone()).collect();
        let mut profiles = BTreeSet::new();
        while let Some(name) = wanted.pop() {
            if !profiles.insert(name.clone()) {
                continue;
            }
            if let Some(parent) = self
                .profiles
                .get(&name)
                .and_then(|d| d.body.get("inherit"))
                .and_then(Value::as_str)
            {
                wanted.push(parent.to_string());
            }
        }
        let mut monitors = BTreeSet::new();
        let mut out = Vec::new();
        for name in profiles {
            let Some(d) = self.profiles.get(&name) else {
                continue;
            };
            if let Some(m) = d
                .body
                .get("netflow")
                .and_then(|n| n.get("monitor"))
                .and_then(Value::as_str)
            {
                monitors.insert(m.to_string());
            }
            out.push(Item::Profile {
                name,
                body: d.body.clone(),
            });
        }
        for name in monitors {
            if let Some(d) = self.monitors.get(&name) {
                out.push(Item::Monitor {
                    name,
                    body: d.body.clone(),
                });
            }
        }
        out
    }

    /// Port `p` as `host` runs it: a migration's destination has the port
    /// in standby, and so has its source once it stopped.
    fn port_item(&self, p: &PortRec, bound: &Attach, host: &str) -> PortItem {
        let mut item = PortItem {
            id: p.id,
            name: p.id.to_string(),
            profile: p.profile.clone(),
            mac: p.mac,
            ips: p.ips.clone(),
            tap: None,
            netdev: None,
            awaiting_netdev: false,
            standby: false,
            migration: None,
        };
        let attach = match &p.moving {
            Some(m) if m.to.host == host => {
                (item.standby, item.migration) = (true, Some(m.migration));
                &m.to.attach
            }
            Some(m) => {
                if m.source_stopped {
                    (item.standby, item.migration) = (true, Some(m.migration));
                }
                bound
            }
            None => bound,
        };
        match attach {
            Attach::Tap(n) => item.tap = Some(n.clone()),
            Attach::Netdev(n) => item.netdev = Some(n.clone()),
            Attach::Unnamed => item.awaiting_netdev = true,
        }
        item
    }

    /// For `host`'s VLANs: the other hosts (with a known tunnel address)
    /// that also carry each, and where those VLANs' VMs live.
    fn remote_of(
        &self,
        host: &str,
        vlans: &BTreeSet<u16>,
    ) -> (BTreeMap<u16, BTreeSet<IpAddr>>, Vec<RemoteMac>) {
        let remote = |id: &u32| {
            let p = self.ports.get(id)?;
            let b = p.binding.as_ref().filter(|b| b.host != host)?;
            let ip = self.hosts.get(&b.host)?.tunnel_ip?;
            Some((p, ip))
        };
        let mut peers: BTreeMap<u16, BTreeSet<IpAddr>> = BTreeMap::new();
        let mut macs = Vec::new();
        // A migration's destination carries the port's VLANs already.
        let destination = |id: &u32| {
            let m = self
                .ports
                .get(id)?
                .moving
                .as_ref()
                .filter(|m| m.to.host != host)?;
            self.hosts.get(&m.to.host)?.tunnel_ip
        };
        for v in vlans {
            let carriers = self.index.carried.get(v).into_iter().flatten();
            for (_, ip) in carriers.clone().filter_map(remote) {
                peers.entry(*v).or_default().insert(ip);
            }
            for ip in carriers.filter_map(destination) {
                peers.entry(*v).or_default().insert(ip);
            }
            let vms = self.index.mac_vlan.get(v).into_iter().flatten();
            // Not the VM that is coming here.
            let coming =
                |(p, _): &(&PortRec, IpAddr)| p.moving.as_ref().is_none_or(|m| m.to.host != host);
            for (p, ip) in vms.filter_map(remote).filter(coming) {
                // A VM under way elsewhere: its entry may go to the
                // destination as soon as the VM is heard from there.
                let moving_to = p
                    .moving
                    .as_ref()
                    .and_then(|m| self.hosts.get(&m.to.host))
                    .and_then(|h| h.tunnel_ip)
                    .filter(|to| *to != ip);
                macs.push(RemoteMac {
                    vlan: *v,
                    mac: p.mac,
                    remote: ip,
                    moving_to,
                });
            }
        }
        (peers, macs)
    }
}

fn unknown_host(host: &str) -> Error {
    Error::NotFound(format!("no host `{host}`: `dvs host list` shows them"))
}

fn check_host_name(host: &str) -> Result<(), Error> {
    if host.is_empty()
        || host.len() > 63
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(Error::Invalid(format!(
            "host name `{host}` is not valid: 1 to 63 letters, digits, '-', '_' or '.'"
        )));
    }
    Ok(())
}

/// Check a set of documents whole; returns each profile resolved.
fn validate(
    profiles: &BTreeMap<String, Doc>,
    monitors: &BTreeMap<String, Doc>,
    pvlan_docs: &BTreeMap<String, Doc>,
) -> Result<(BTreeMap<String, Policy>, PrivateVlans), Error> {
    let raw_profiles = profiles
        .values()
        .map(|d| {
            serde_json::from_value::<RawProfile>(d.body.clone())
                .map_err(|e| Error::Invalid(format!("profile `{}`: {e}", d.name)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let raw_monitors = monitors
        .values()
        .map(|d| {
            serde_json::from_value::<RawMonitor>(d.body.clone())
                .map_err(|e| Error::Invalid(format!("monitor `{}`: {e}", d.name)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let monitors =
        NetflowMonitor::set_from_raw(&raw_monitors).map_err(|e| Error::Invalid(e.to_string()))?;
    let resolved = profile::resolve(&raw_profiles).map_err(|e| Error::Invalid(e.to_string()))?;
    profile::check_monitors(&resolved, &monitors).map_err(|e| Error::Invalid(e.to_string()))?;
    let decls = pvlan_docs
        .values()
        .map(|d| {
            let mut body = d.body.clone();
            if let Some(m) = body.as_object_mut() {
                m.remove("kind");
                m.remove("name");
            }
            let at = format!("private VLAN `{}`", d.name);
            serde_json::from_value::<PrivateVlan>(body)
                .map(|p| (at.clone(), p))
                .map_err(|e| Error::Invalid(format!("{at}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let pvlans = PrivateVlans::new(decls).map_err(Error::Invalid)?;
    for (name, policy) in &resolved {
        if let Some(mode) = &policy.vlan {
            pvlans
                .check_mode(mode)
                .map_err(|e| Error::Invalid(format!("profile `{name}`, vlan: {e}")))?;
        }
    }
    Ok((resolved, pvlans))
}

/// A port needs its profile to exist and to give it a VLAN.
/// Static IP bindings as given (`--ip`): addresses a VM can have, each
/// kept once, in the order given.
fn parse_ips(ips: &[String]) -> Result<Vec<IpAddr>, Error> {
    let mut out: Vec<IpAddr> = Vec::new();
    for s in ips {
        let ip: IpAddr = s.trim().parse().map_err(|_| {
            Error::Invalid(format!(
                "--ip `{s}` is not an IP address: give one address, like 10.0.0.5 or 2001:db8::5"
            ))
        })?;
        let bad = match ip {
            IpAddr::V4(a) => a.is_unspecified() || a.is_multicast() || a.is_broadcast(),
            IpAddr::V6(a) => a.is_unspecified() || a.is_multicast(),
        };
        if bad {
            return Err(Error::Invalid(format!(
                "--ip {ip} is not a unicast address a VM can have"
            )));
        }
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

fn check_port_policy(p: &PortRec, resolved: &BTreeMap<String, Policy>) -> Result<(), Error> {
    match resolved.get(&p.profile) {
        None => Err(Error::Invalid(format!(
            "port {} takes profile `{}`, which would not exist",
            p.id, p.profile
        ))),
        Some(policy) if policy.vlan.is_none() => Err(Error::Invalid(format!(
            "port {} would have no VLAN: profile `{}` (or one it inherits) must set `vlan:`",
            p.id, p.profile
        ))),
        Some(_) => Ok(()),
    }
}

/// The top-level fields that differ between two documents.
fn changed_fields(old: &Value, new: &Value) -> Vec<String> {
    let keys: BTreeSet<&String> = old
        .as_object()
        .into_iter()
        .flat_map(|m| m.keys())
        .chain(new.as_object().into_iter().flat_map(|m| m.keys()))
        .collect();
    keys.into_iter()
        .filter(|k| old.get(k.as_str()) != new.get(k.as_str()))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new port of VM `vm` with MAC `mac` on `profile`, no IP bindings.
    fn port(c: &mut Chassis, vm: &str, mac: &str, profile: &str) -> PortId {
        c.create_port(vm, mac, profile, &[]).unwrap()
    }
    use serde_json::json;

    const BASE: &str = "kind: PortProfile\nname: base\nvlan: { mode: access, id: 10 }\n---\n\
        kind: PortProfile\nname: web\ninherit: base\nacl:\n  in:\n    - { action: permit, proto: tcp, dst_port: 80 }\n    - { action: deny }\n";

    fn chassis() -> Chassis {
        let mut c = Chassis::default();
        c.apply(BASE, false).unwrap();
        c
    }

    #[test]
    fn apply_is_versioned_and_a_dry_run_changes_nothing() {
        let mut c = Chassis::default();
        let ch = c.apply(BASE, false).unwrap();
        assert_eq!(
            ch,
            vec![
                "profile base: created (version 1)",
                "profile web: created (version 1)"
            ]
        );
        assert_eq!(c.revision(), 1);
        // The same file again changes nothing.
        assert!(c.apply(BASE, false).unwrap().is_empty());
        assert_eq!(c.revision(), 1);
        let edit = "kind: PortProfile\nname: web\ninherit: base\nqos: { in: { avg_mbps: 10 } }\n";
        let ch = c.apply(edit, true).unwrap();
        assert_eq!(ch, vec!["profile web: version 1 → 2 (acl, qos)"]);
        assert_eq!(c.doc(Kind::PortProfile, "web").unwrap().version, 1);
        c.apply(edit, false).unwrap();
        assert_eq!(c.doc(Kind::PortProfile, "web").unwrap().version, 2);
        assert_eq!(c.revision(), 2);
        let d = c.take_dirty();
        assert!(d
            .docs
            .contains(&("PortProfile".to_string(), "web".to_string())));
    }

    #[test]
    fn bad_applies_are_rejected_whole_with_the_message_users_see() {
        let mut c = chassis();
        let before = c.revision();
        let e = |c: &mut Chassis, y: &str| c.apply(y, false).unwrap_err().to_string();
        assert_eq!(
            e(&mut c, "kind: PortProfile\nname: a\nvlan: { mode: access, id: 10 }\n---\nkind: PortProfile\nname: b\nacl: { in: [ { action: permit, proto: tcp, dst_port: 70000 } ] }\n"),
            "profile `b`, acl.in[0], dst_port: port 70000 is out of range 0..=65535"
        );
        assert!(c.doc(Kind::PortProfile, "a").is_none(), "all or nothing");
        assert_eq!(
            e(&mut c, "kind: PortProfile\nname: x\ninherit: nope\n"),
            "profile `x`, inherit: unknown profile `nope`; profiles here: base, web, x"
        );
        assert!(e(
            &mut c,
            "kind: PortProfile\nname: base\ninherit: web\nvlan: { mode: access, id: 10 }\n"
        )
        .contains("inherit in a cycle"));
        assert_eq!(
            e(&mut c, "kind: Portprofile\nname: x\n"),
            "document 1: kind `Portprofile` is not one this file may hold: expected PortProfile, NetflowMonitor or PrivateVlan"
        );
        assert!(e(
            &mut c,
            "kind: PortProfile\nname: x\nnetflow: { monitor: m }\n"
        )
        .contains("unknown monitor `m`"));
        assert!(e(
            &mut c,
            "kind: NetflowMonitor\nname: m\nversion: 7\ncollectors: [\"127.0.0.1:2055\"]\n"
        )
        .contains("version: `7` is not an export format"));
        let big = "#".repeat(MAX_APPLY_BYTES + 1);
        assert!(e(&mut c, &big).contains("apply at most"));
        assert_eq!(c.revision(), before);
    }

    #[test]
    fn profiles_in_use_cannot_be_deleted_or_lose_their_vlan() {
        let mut c = chassis();
        let id = port(&mut c, "vm1", "02:00:00:00:00:01", "web");
        assert_eq!(id.to_string(), "veth1");
        assert_eq!(
            c.delete_doc(Kind::PortProfile, "web")
                .unwrap_err()
                .to_string(),
            "profile `web` is in use by port veth1: give them another profile first"
        );
        assert_eq!(
            c.delete_doc(Kind::PortProfile, "base")
                .unwrap_err()
                .to_string(),
            "profile `base` is inherited by web: change them first"
        );
        let e = c
            .apply("kind: PortProfile\nname: base\nmtu: 9000\n", false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `mtu`"), "{e}");
        let e = c
            .apply("kind: PortProfile\nname: base\n", false)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "port veth1 would have no VLAN: profile `web` (or one it inherits) must set `vlan:`"
        );
        assert!(c
            .delete_doc(Kind::PortProfile, "nope")
            .unwrap_err()
            .to_string()
            .starts_with("no profile `nope`"));
        c.delete_port(id).unwrap();
        c.delete_doc(Kind::PortProfile, "web").unwrap();
        // IDs are never given twice.
        assert_eq!(
            port(&mut c, "vm2", "02:00:00:00:00:02", "base").to_string(),
            "veth2"
        );
    }

    #[test]
    fn ports_are_checked() {
        let mut c = chassis();
        assert!(c.create_port("", "02:00:00:00:00:01", "web", &[]).is_err());
        assert!(c
            .create_port("vm", "02:00:00:00:00", "web", &[])
            .unwrap_err()
            .to_string()
            .starts_with("--mac: MAC address `02:00:00:00:00` is not valid"));
        assert!(c
            .create_port("vm", "01:00:00:00:00:01", "web", &[])
            .is_err());
        assert!(c
            .create_port("vm", "02:00:00:00:00:01", "nope", &[])
            .unwrap_err()
            .to_string()
            .starts_with("no profile `nope`; profiles: base, web"));
        let a = port(&mut c, "vm", "02:00:00:00:00:01", "web");
        assert!(c
            .create_port("vm", "02:00:00:00:00:01", "web", &[])
            .unwrap_err()
            .to_string()
            .contains("belongs to port veth1"));
        let b = port(&mut c, "vm", "02:00:00:00:00:02", "web");
        c.bind_port(a, "h1", Attach::Tap("tap-a".into())).unwrap();
        assert!(c
            .bind_port(b, "h1", Attach::Tap("tap-a".into()))
            .unwrap_err()
            .to_string()
            .contains("belongs to port veth1"));
        assert!(c.bind_port(b, "h 1", Attach::Tap("tap-b".into())).is_err());
        assert_eq!(c.host("h1").unwrap().module, 3);
    }

    #[test]
    fn ip_bindings_are_addresses_each_owned_once_per_vlan() {
        let mut c = chassis();
        c.apply(
            "kind: PortProfile\nname: db\nvlan: { mode: access, id: 20 }\n",
            false,
        )
        .unwrap();
        let ips = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let a = c
            .create_port(
                "a",
                "02:00:00:00:00:0a",
                "web",
                &ips(&["10.0.0.5", "2001:db8::5", "10.0.0.5"]),
            )
            .unwrap();
        assert_eq!(
            c.port(a).unwrap().ips,
            [
                "10.0.0.5".parse::<IpAddr>().unwrap(),
                "2001:db8::5".parse().unwrap()
            ]
        );
        let item = c.port_item(c.port(a).unwrap(), &Attach::Unnamed, "h1");
        assert_eq!(item.ips.len(), 2, "sent with the port");
        let e = |r: Result<PortId, Error>| r.unwrap_err().to_string();
        assert_eq!(
            e(c.create_port("b", "02:00:00:00:00:0b", "web", &ips(&["10.0.0.5"]))),
            "--ip 10.0.0.5: bound to port veth1 (VM `a`) on VLAN 10 already"
        );
        assert!(
            e(c.create_port("b", "02:00:00:00:00:0b", "web", &ips(&["10.0.0"])))
                .contains("--ip `10.0.0` is not an IP address")
        );
        assert!(
            e(c.create_port("b", "02:00:00:00:00:0b", "web", &ips(&["224.0.0.1"])))
                .contains("not a unicast address")
        );
        // Another VLAN may use it; a profile change that brings it into
        // VLAN 10 is refused.
        let d = c
            .create_port("d", "02:00:00:00:00:0d", "db", &ips(&["10.0.0.5"]))
            .unwrap();
        assert!(c
            .set_port_profile(d, "web")
            .unwrap_err()
            .to_string()
            .contains("bound to port veth1"));
        c.set_port_ips(a, &[]).unwrap();
        assert!(c.port(a).unwrap().ips.is_empty());
        c.set_port_profile(d, "web").unwrap();
    }

    #[test]
    fn a_host_gets_its_ports_their_policy_segments_and_remote_macs() {
        let mut c = chassis();
        c.apply(
            "kind: NetflowMonitor\nname: m\nversion: ipfix\ncollectors: [\"10.0.0.100:4739\"]\n---\n\
             kind: PortProfile\nname: db\nvlan: { mode: access, id: 20 }\nnetflow: { monitor: m }\n",
            false,
        )
        .unwrap();
        let a = port(&mut c, "vm-a", "02:00:00:00:00:0a", "web");
        let b = port(&mut c, "vm-b", "02:00:00:00:00:0b", "web");
        let d = port(&mut c, "vm-d", "02:00:00:00:00:0d", "db");
        c.bind_port(a, "h1", Attach::Tap("ta".into())).unwrap();
        c.bind_port(b, "h2", Attach::Tap("tb".into())).unwrap();
        c.bind_port(d, "h2", Attach::Netdev("vnet0".into()))
            .unwrap();
        c.register("h1", "10.0.0.1".parse().unwrap()).unwrap();
        c.register("h2", "10.0.0.2".parse().unwrap()).unwrap();
        assert!(c
            .register("h3", "10.0.0.2".parse().unwrap())
            .unwrap_err()
            .to_string()
            .contains("is host h2's"));
        let items = c.host_items("h1");
        let keys: Vec<&str> = items.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            vec![
                "chassis",
                "mac/10/02:00:00:00:00:0b",
                "port/veth1",
                "profile/base",
                "profile/web",
                "segments",
                "tunnel_peers"
            ]
        );
        assert_eq!(items["tunnel_peers"].to_json(), json!(["10.0.0.2"]));
        assert_eq!(
            items["segments"].to_json(),
            json!([{ "vlan": 10, "vni": 10010, "peers": ["10.0.0.2"] }])
        );
        let items2 = c.host_items("h2");
        assert!(items2.contains_key("monitor/m"));
        assert!(items2.contains_key("mac/10/02:00:00:00:00:0a"));
        assert_eq!(items2["port/veth3"].to_json()["netdev"], "vnet0");
        // The assembled file is a valid agent file.
        let doc = dvs_switch::agent::config::assemble(
            "h2",
            &items2,
            &json!({ "tunnel": { "local": "10.0.0.2" } }),
        );
        let cfg = dvs_switch::agent::config::AgentConfig::parse(&doc.to_string()).unwrap();
        assert_eq!(cfg.ports.len(), 2);
        assert_eq!(cfg.static_macs.len(), 1);
        assert!(cfg.ports[1].port.netflow.is_some());
        assert_eq!(
            cfg.tunnel_peers,
            vec!["10.0.0.1".parse::<IpAddr>().unwrap()]
        );
        // Acks from the future are refused.
        let r = c.revision();
        assert!(c
            .ack("h1", r + 1)
            .unwrap_err()
            .to_string()
            .contains("from the future"));
        c.ack("h1", r).unwrap();
        assert_eq!(c.host("h1").unwrap().acked, r);
    }

    #[test]
    fn a_draining_host_keeps_its_ports_and_takes_no_new_one() {
        let mut c = chassis();
        let a = port(&mut c, "vm-a", "02:00:00:00:00:0a", "web");
        let b = port(&mut c, "vm-b", "02:00:00:00:00:0b", "web");
        c.bind_port(a, "h1", Attach::Tap("ta".into())).unwrap();
        assert!(c.drain_host("h1", true).unwrap());
        assert!(!c.drain_host("h1", true).unwrap(), "already draining");
        assert!(c.host("h1").unwrap().draining);
        let e = c.bind_port(b, "h1", Attach::Tap("tb".into())).unwrap_err();
        assert!(e.to_string().contains("host h1 is draining"), "{e}");
        // Its own port may be bound there again (a VM restarting in place).
        c.bind_port(a, "h1", Attach::Netdev("vnet0".into()))
            .unwrap();
        assert!(c
            .drain_host("h9", true)
            .unwrap_err()
            .to_string()
            .contains("no host `h9`"));
        let e = c.remove_host("h1").unwrap_err();
        assert!(e.to_string().contains("still has ports veth1"), "{e}");
        c.bind_port(a, "h2", Attach::Tap("ta".into())).unwrap();
        c.remove_host("h1").unwrap();
        assert!(c.host("h1").is_none());
        assert!(c.remove_host("h1").is_err());
    }

    #[test]
    fn other_hosts_learn_where_a_migrating_vm_is_going() {
        let mut c = chassis();
        let a = port(&mut c, "vm-a", "02:00:00:00:00:0a", "web");
        let b = port(&mut c, "vm-b", "02:00:00:00:00:0b", "web");
        c.bind_port(a, "h1", Attach::Tap("ta".into())).unwrap();
        c.bind_port(b, "h3", Attach::Tap("tb".into())).unwrap();
        for (h, ip) in [("h1", "10.0.0.1"), ("h2", "10.0.0.2"), ("h3", "10.0.0.3")] {
            c.register(h, ip.parse().unwrap()).unwrap();
        }
        let key = "mac/10/02:00:00:00:00:0a";
        let before = c.host_items("h3")[key].to_json();
        assert_eq!(before["remote"], "10.0.0.1");
        assert!(before.get("moving_to").is_none(), "{before}");
        c.begin_migration(a, "h2", None, std::time::Duration::ZERO)
            .unwrap();
        let during = c.host_items("h3")[key].to_json();
        assert_eq!(
            (during["remote"].as_str(), during["moving_to"].as_str()),
            (Some("10.0.0.1"), Some("10.0.0.2"))
        );
        // The destination does not place the VM that is coming to it.
        assert!(!c.host_items("h2").contains_key(key));
    }
}
