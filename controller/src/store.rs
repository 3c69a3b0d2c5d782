//! The controller's embedded, transactional store: a redb database file
//! (`chassis.redb`) under `--data-dir`. Records are JSON (documents as users
//! wrote them, ports, hosts, counters); each chassis change is written in
//! one transaction, so a crash leaves the state before or after it.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use serde::de::DeserializeOwned;

use crate::chassis::{Chassis, Dirty, Kind, Meta};
use crate::Error;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// "PortProfile/NAME" or "NetflowMonitor/NAME" → [`Doc`].
const DOCS: TableDefinition<&str, &[u8]> = TableDefinition::new("docs");
const PORTS: TableDefinition<u32, &[u8]> = TableDefinition::new("ports");
const HOSTS: TableDefinition<&str, &[u8]> = TableDefinition::new("hosts");
const MIGRATIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("migrations");
/// A migration's snapshot from the source, kept (binary, as sent) until the
/// destination runs from it.
const HANDOVERS: TableDefinition<u64, &[u8]> = TableDefinition::new("handovers");
/// A migration's pre-copy from the source, kept likewise (the handover is
/// a delta of it).
const BASES: TableDefinition<u64, &[u8]> = TableDefinition::new("bases");

/// Which of a migration's snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// The pre-copy.
    Base,
    /// What the source handed over when it stopped.
    Handover,
}

impl Kept {
    fn table(self) -> TableDefinition<'static, u64, &'static [u8]> {
        match self {
            Kept::Base => BASES,
            Kept::Handover => HANDOVERS,
        }
    }
}

/// The database file.
#[derive(Debug)]
pub struct Store {
    db: Database,
    path: PathBuf,
}

impl Store {
    /// Open (or create) the store in `dir`.
    ///
    /// # Errors
    /// [`Error::Store`] when the directory or file cannot be made or is not
    /// a dvs store.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Store {
            path: dir.display().to_string(),
            msg: e.to_string(),
        })?;
        let path = dir.join("chassis.redb");
        let db = Database::create(&path).map_err(|e| Error::Store {
            path: path.display().to_string(),
            msg: e.to_string(),
        })?;
        let s = Store { db, path };
        // Every table exists from the start, so that reads never miss one.
        let w = s.db.begin_write().map_err(|e| s.err(e))?;
        for t in [META, DOCS, HOSTS] {
            w.open_table(t).map_err(|e| s.err(e))?;
        }
        w.open_table(PORTS).map_err(|e| s.err(e))?;
        for t in [MIGRATIONS, HANDOVERS, BASES] {
            w.open_table(t).map_err(|e| s.err(e))?;
        }
        w.commit().map_err(|e| s.err(e))?;
        Ok(s)
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        Error::Store {
            path: self.path.display().to_string(),
            msg: e.to_string(),
        }
    }

    fn decode<T: DeserializeOwned>(&self, what: &str, b: &[u8]) -> Result<T, Error> {
        serde_json::from_slice(b).map_err(|e| self.err(format!("record {what}: {e}")))
    }

    /// Rebuild the chassis from what is stored.
    ///
    /// # Errors
    /// [`Error::Store`] for an unreadable record; [`Error::Invalid`] when
    /// the stored documents no longer validate.
    pub fn load(&self) -> Result<Chassis, Error> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let meta_t = r.open_table(META).map_err(|e| self.err(e))?;
        let meta: Meta = match meta_t.get("meta").map_err(|e| self.err(e))? {
            Some(v) => self.decode("meta", v.value())?,
            None => Meta::default(),
        };
        let docs = self.rows(&r, DOCS)?;
        let ports = self.rows(&r, PORTS)?;
        let hosts = self.rows(&r, HOSTS)?;
        let migrations = self.rows(&r, MIGRATIONS)?;
        Chassis::from_records(meta, docs, ports, hosts, migrations)
    }

    /// Every record of table `t`.
    fn rows<K: redb::Key + 'static, T: DeserializeOwned>(
        &self,
        r: &redb::ReadTransaction,
        t: TableDefinition<K, &[u8]>,
    ) -> Result<Vec<T>, Error> {
        let table = r.open_table(t).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            out.push(self.decode(&format!("{} {:?}", t.name(), k.value()), v.value())?);
        }
        Ok(out)
    }

    /// Write what `dirty` names, as `chassis` now has it, in one durable
    /// transaction.
    ///
    /// # Errors
    /// [`Error::Store`]; nothing is written then.
    pub fn commit(&self, chassis: &Chassis, dirty: &Dirty) -> Result<(), Error> {
        self.commit_with(chassis, dirty, true, None)
    }

    /// [`Store::commit`]; without `durable` the transaction reaches the
    /// disk with the next durable one (for acks: frequent, and harmless to
    /// lose in a crash — agents ack again).
    ///
    /// `handover`: a migration's snapshot kept in the same transaction
    /// (until the migration is finished).
    ///
    /// # Errors
    /// [`Error::Store`]; nothing is written then.
    pub fn commit_with(
        &self,
        chassis: &Chassis,
        dirty: &Dirty,
        durable: bool,
        handover: Option<(Kept, u64, &[u8])>,
    ) -> Result<(), Error> {
        if dirty.is_empty() && handover.is_none() {
            return Ok(());
        }
        let mut w = self.db.begin_write().map_err(|e| self.err(e))?;
        if !durable {
            w.set_durability(redb::Durability::None)
                .map_err(|e| self.err(e))?;
        }
        {
            if dirty.meta {
                let mut t = w.open_table(META).map_err(|e| self.err(e))?;
                t.insert("meta", json(&chassis.meta).as_slice())
                    .map_err(|e| self.err(e))?;
            }
            let mut t = w.open_table(DOCS).map_err(|e| self.err(e))?;
            for (kind, name) in &dirty.docs {
                let key = format!("{kind}/{name}");
                let k = Kind::from_name(kind).unwrap_or(Kind::PortProfile);
                match chassis.doc(k, name) {
                    Some(d) => {
                        t.insert(key.as_str(), json(d).as_slice())
                            .map_err(|e| self.err(e))?;
                    }
                    None => {
                        t.remove(key.as_str()).map_err(|e| self.err(e))?;
                    }
                }
            }
            let mut t = w.open_table(PORTS).map_err(|e| self.err(e))?;
            for id in &dirty.ports {
                match dvs_proto::PortId::new(*id).and_then(|p| chassis.port(p)) {
                    Some(p) => {
                        t.insert(*id, json(p).as_slice()).map_err(|e| self.err(e))?;
                    }
                    None => {
                        t.remove(*id).map_err(|e| self.err(e))?;
                    }
                }
            }
            if let Some((kept, id, bytes)) = handover {
                // With the record of the step that brought it: kept
                // together or not at all.
                let mut h = w.open_table(kept.table()).map_err(|e| self.err(e))?;
                h.insert(id, bytes).map_err(|e| self.err(e))?;
            }
            let mut t = w.open_table(MIGRATIONS).map_err(|e| self.err(e))?;
            for id in &dirty.migrations {
                if let Some(m) = chassis.migration(*id) {
                    t.insert(*id, json(m).as_slice()).map_err(|e| self.err(e))?;
                }
                if chassis.migration(*id).is_none_or(|m| m.finished()) {
                    for kept in [Kept::Base, Kept::Handover] {
                        let mut h = w.open_table(kept.table()).map_err(|e| self.err(e))?;
                        h.remove(*id).map_err(|e| self.err(e))?;
                    }
                }
            }
            let mut t = w.open_table(HOSTS).map_err(|e| self.err(e))?;
            for name in &dirty.hosts {
                match chassis.host(name) {
                    Some(h) => {
                        t.insert(name.as_str(), json(h).as_slice())
                            .map_err(|e| self.err(e))?;
                    }
                    None => {
                        t.remove(name.as_str()).map_err(|e| self.err(e))?;
                    }
                }
            }
        }
        w.commit().map_err(|e| self.err(e))
    }
}

impl Store {
    /// Migration `id`'s kept snapshot of kind `kept`.
    ///
    /// # Errors
    /// [`Error::Store`].
    pub fn kept(&self, kept: Kept, id: u64) -> Result<Option<Vec<u8>>, Error> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = r.open_table(kept.table()).map_err(|e| self.err(e))?;
        Ok(t.get(id)
            .map_err(|e| self.err(e))?
            .map(|v| v.value().to_vec()))
    }
}

/// A record's JSON (these plain records always serialise).
fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chassis::Attach;

    #[test]
    fn the_chassis_survives_a_restart_with_the_same_ids() {
        let dir = std::env::temp_dir().join(format!("dvs-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let store = Store::open(&dir).unwrap();
            let mut c = store.load().unwrap();
            c.apply(
                "kind: PortProfile\nname: web\nvlan: { mode: access, id: 10 }\n",
                false,
            )
            .unwrap();
            let a = c
                .create_port("vm-a", "02:00:00:00:00:0a", "web", &[])
                .unwrap();
            let b = c
                .create_port("vm-b", "02:00:00:00:00:0b", "web", &[])
                .unwrap();
            c.bind_port(a, "h1", Attach::Tap("ta".into())).unwrap();
            c.register("h1", "10.0.0.1".parse().unwrap()).unwrap();
            c.delete_port(b).unwrap();
            store.commit(&c, &c.clone().take_dirty()).unwrap();
        }
        let store = Store::open(&dir).unwrap();
        let mut c = store.load().unwrap();
        assert_eq!(c.revision(), 6);
        assert_eq!(c.ports().count(), 1);
        let p = c.ports().next().unwrap();
        assert_eq!(
            (p.id.to_string().as_str(), p.vm.as_str()),
            ("veth1", "vm-a")
        );
        assert_eq!(c.host("h1").unwrap().module, 3);
        assert_eq!(
            c.host("h1").unwrap().tunnel_ip,
            Some("10.0.0.1".parse().unwrap())
        );
        assert_eq!(c.doc(Kind::PortProfile, "web").unwrap().version, 1);
        // The next port takes a new number: veth2 was used once.
        assert_eq!(
            c.create_port("vm-c", "02:00:00:00:00:0c", "web", &[])
                .unwrap()
                .to_string(),
            "veth3"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
