//! A host's desired state as the controller sends it: keyed items, each
//! of a type both sides use. The controller makes them
//! (`Chassis::host_items`), sends each as its key and its JSON, and sends
//! again only the items whose JSON changed; the agent reads each back into
//! its type ([`Item::parse`]) and puts them together into an agent file
//! (the port items are the file's port entries, the segments its
//! segments), which it checks whole before anything runs.
//!
//! A renamed or retyped field here changes both sides at once; an item the
//! agent cannot read is refused with its key and the reason.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{MacAddr, PortId};

/// One item of a host's desired state.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// The chassis number (flow exports' source ID / observation domain).
    Chassis(u32),
    /// The other hosts' tunnel endpoints: the only sources of VXLAN taken.
    TunnelPeers(Vec<IpAddr>),
    /// A port profile this host's ports use, as the admin wrote it.
    Profile {
        name: String,
        body: Value,
    },
    /// A NetFlow monitor those profiles use, as the admin wrote it.
    Monitor {
        name: String,
        body: Value,
    },
    Port(PortItem),
    /// Where a VM of another host is (a static MAC behind the tunnel).
    RemoteMac(RemoteMac),
    /// The VLAN segments this host stretches to others.
    Segments(Vec<Segment>),
    /// The chassis's private VLANs (`kind: PrivateVlan` documents).
    PrivateVlans(Vec<crate::pvlan::PrivateVlan>),
}

/// A port of this host, bound to its VM's interface.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortItem {
    pub id: PortId,
    pub name: String,
    pub profile: String,
    pub mac: MacAddr,
    /// The VM's static IP bindings (`dvs port create --ip`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<std::net::IpAddr>,
    /// A TAP the agent makes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// An interface the VMM makes (now or later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netdev: Option<String>,
    /// The VMM has not named its interface yet.
    #[serde(default, skip_serializing_if = "is_false")]
    pub awaiting_netdev: bool,
    /// Not forwarding: a migration's destination before its switchover,
    /// or its source after it stopped.
    #[serde(default, skip_serializing_if = "is_false")]
    pub standby: bool,
    /// The migration the standby belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<u64>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A VM of another host: its MAC on a VLAN, behind that host's tunnel
/// endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoteMac {
    pub vlan: u16,
    pub mac: MacAddr,
    pub remote: IpAddr,
    /// The VM is under way to the host at this address (a migration): the
    /// entry moves there when the VM is heard from there, before the
    /// controller's next state says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moving_to: Option<IpAddr>,
}

/// A VLAN stretched over VXLAN to the hosts that also carry it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Segment {
    pub vlan: u16,
    pub vni: u32,
    pub peers: Vec<IpAddr>,
}

impl Item {
    /// Its key: one per item of a host's state.
    pub fn key(&self) -> String {
        match self {
            Item::Chassis(_) => "chassis".into(),
            Item::TunnelPeers(_) => "tunnel_peers".into(),
            Item::Profile { name, .. } => format!("profile/{name}"),
            Item::Monitor { name, .. } => format!("monitor/{name}"),
            Item::Port(p) => format!("port/{}", p.id),
            Item::RemoteMac(m) => format!("mac/{}/{}", m.vlan, m.mac),
            Item::Segments(_) => "segments".into(),
            Item::PrivateVlans(_) => "private_vlans".into(),
        }
    }

    /// What is sent of it.
    pub fn to_json(&self) -> Value {
        let v = match self {
            Item::Chassis(n) => Ok(Value::from(*n)),
            Item::TunnelPeers(p) => serde_json::to_value(p),
            Item::Profile { body, .. } | Item::Monitor { body, .. } => Ok(body.clone()),
            Item::Port(p) => serde_json::to_value(p),
            Item::RemoteMac(m) => serde_json::to_value(m),
            Item::Segments(s) => serde_json::to_value(s),
            Item::PrivateVlans(p) => serde_json::to_value(p),
        };
        // Plain data (strings, numbers, addresses) always encodes.
        v.unwrap_or(Value::Null)
    }

    /// Read the item sent as `key` and `json`.
    ///
    /// # Errors
    /// The key is not one of an item, or its JSON is not that item's:
    /// the message names the key and what is wrong.
    pub fn parse(key: &str, json: &str) -> Result<Item, String> {
        let v: Value = serde_json::from_str(json).map_err(|e| format!("item `{key}`: {e}"))?;
        Item::from_value(key, v)
    }

    /// [`Item::parse`], from JSON already read.
    ///
    /// # Errors
    /// As [`Item::parse`].
    pub fn from_value(key: &str, v: Value) -> Result<Item, String> {
        let bad = |e: serde_json::Error| format!("item `{key}`: {e}");
        let (kind, name) = key.split_once('/').unwrap_or((key, ""));
        let name = name.to_string();
        let item = match kind {
            "chassis" => Item::Chassis(serde_json::from_value(v).map_err(bad)?),
            "tunnel_peers" => Item::TunnelPeers(serde_json::from_value(v).map_err(bad)?),
            "profile" => Item::Profile { name, body: v },
            "monitor" => Item::Monitor { name, body: v },
            "port" => Item::Port(serde_json::from_value(v).map_err(bad)?),
            "mac" => Item::RemoteMac(serde_json::from_value(v).map_err(bad)?),
            "segments" => Item::Segments(serde_json::from_value(v).map_err(bad)?),
            "private_vlans" => Item::PrivateVlans(serde_json::from_value(v).map_err(bad)?),
            _ => {
                return Err(format!(
                    "item `{key}`: not an item this agent knows (chassis, tunnel_peers, \
                     profile/NAME, monitor/NAME, port/ID, mac/VLAN/MAC, segments, private_vlans)"
                ))
            }
        };
        if item.key() != key {
            return Err(format!(
                "item `{key}`: its contents make it `{}`",
                item.key()
            ));
        }
        Ok(item)
    }
}

/// Items by key as JSON (a saved desired state): `#[serde(with = "items_json")]`.
pub mod items_json {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_json::Value;

    use super::Item;

    /// # Errors
    /// The serializer's.
    pub fn serialize<S: Serializer>(
        items: &BTreeMap<String, Item>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let m: BTreeMap<&str, Value> = items
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_json()))
            .collect();
        m.serialize(s)
    }

    /// # Errors
    /// The deserializer's, or an item that does not read ([`Item::from_value`]).
    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Item>, D::Error> {
        let m = BTreeMap::<String, Value>::deserialize(d)?;
        m.into_iter()
            .map(|(k, v)| Item::from_value(&k, v).map(|i| (k, i)))
            .collect::<Result<_, _>>()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_round_trip_through_their_key_and_json() {
        let items = [
            Item::Chassis(3),
            Item::TunnelPeers(vec!["10.0.0.2".parse().unwrap()]),
            Item::Profile {
                name: "web".into(),
                body: serde_json::json!({ "kind": "PortProfile", "name": "web" }),
            },
            Item::Port(PortItem {
                id: "veth7".parse().unwrap(),
                name: "veth7".into(),
                profile: "web".into(),
                mac: "02:00:00:00:00:0a".parse().unwrap(),
                ips: vec!["10.0.0.7".parse().unwrap(), "2001:db8::7".parse().unwrap()],
                tap: None,
                netdev: Some("vnet0".into()),
                awaiting_netdev: false,
                standby: true,
                migration: Some(4),
            }),
            Item::RemoteMac(RemoteMac {
                vlan: 10,
                mac: "02:00:00:00:00:0b".parse().unwrap(),
                remote: "10.0.0.2".parse().unwrap(),
                moving_to: Some("10.0.0.3".parse().unwrap()),
            }),
            Item::Segments(vec![Segment {
                vlan: 10,
                vni: 10010,
                peers: vec![],
            }]),
        ];
        for i in items {
            let back = Item::parse(&i.key(), &i.to_json().to_string()).unwrap();
            assert_eq!(back, i);
        }
        let json = Item::Port(PortItem {
            id: "veth1".parse().unwrap(),
            name: "veth1".into(),
            profile: "p".into(),
            mac: "02:00:00:00:00:01".parse().unwrap(),
            ips: Vec::new(),
            tap: Some("t1".into()),
            netdev: None,
            awaiting_netdev: false,
            standby: false,
            migration: None,
        })
        .to_json();
        // What is not set is not sent.
        assert_eq!(
            json,
            serde_json::json!({ "id": "veth1", "name": "veth1", "profile": "p", "mac": "02:00:00:00:00:01", "tap": "t1" })
        );
    }

    #[test]
    fn bad_items_are_refused_with_their_key_and_reason() {
        let e = Item::parse("port/veth1", r#"{"id": "veth1"}"#).unwrap_err();
        assert!(
            e.starts_with("item `port/veth1`:") && e.contains("missing field"),
            "{e}"
        );
        let e = Item::parse(
            "port/veth2",
            r#"{"id": "veth1", "name": "a", "profile": "p", "mac": "02:00:00:00:00:01"}"#,
        )
        .unwrap_err();
        assert!(e.contains("make it `port/veth1`"), "{e}");
        let e = Item::parse("colour", "1").unwrap_err();
        assert!(e.contains("not an item") && e.contains("segments"), "{e}");
        let e = Item::parse("tunnel_peers", r#"["not an address"]"#).unwrap_err();
        assert!(e.starts_with("item `tunnel_peers`"), "{e}");
    }
}
