//! libvirt's qemu hook protocol, sans-IO: `/etc/libvirt/hooks/qemu DOMAIN
//! OPERATION SUB-OPERATION EXTRA` with the domain's XML on stdin. This
//! module reads the XML (the VM's interfaces and their MACs) and says what
//! each operation means for the VM's ports; `dvs hook libvirt` carries it
//! out against the controller.
//!
//! The order below is libvirt's own (9.0, `src/qemu/qemu_process.c`:
//! `qemuProcessInit` runs `prepare begin`, `qemuProcessLaunch` creates the
//! TAPs — `qemuBuildInterfaceConnect` while building the command line —
//! then runs `start begin` and execs QEMU, `qemuProcessFinishStartup`
//! runs `started begin`, `qemuProcessStop` runs `stopped end` after QEMU is
//! gone and deletes the TAPs before `release end`; `qemu_migration.c`:
//! `qemuMigrationDstPrepareAny` runs `migrate begin` on the destination
//! before all of that, `qemuMigrationDstFinish` resumes the VM there, and
//! the source's `qemuMigrationSrcConfirmPhase` stops it at the source).
//! A TAP libvirt names itself (`vnetN`, no `<target dev>` in the
//! definition) has no name in the XML of `prepare begin` or `migrate begin`
//! — a migrated domain's generated name is dropped on the destination — and
//! has it from `start begin` on.
//!
//! | operation | when | dvs |
//! |---|---|---|
//! | `migrate begin` | destination, first: the incoming XML (libvirt takes stdout as a new XML: dvs prints nothing there) | begin each port's migration to this host (its interface if the XML names it, else named later) and return once the port is here in standby with its policy; a failure aborts the migration |
//! | `prepare begin` | before the TAPs exist (a start, a restore, a migration's destination) | migrating here: wait for the policy. Otherwise bind the port here (named later if the XML has no name) and wait until the host applied it; a port that runs on another host is refused, one bound elsewhere without its interface there moves here (a cold move) |
//! | `start begin` | the TAPs exist, QEMU not started yet | each port takes the interface the XML now names (the migration's destination, or the binding) |
//! | `started begin` | QEMU runs (paused on a migration's destination) | nothing: a migrated VM's switchover comes from the destination (its first frame, or QEMU reading its TAP) |
//! | `stopped end` | QEMU is gone | a migration's source: the VM runs at the destination, activate; its destination: the incoming migration failed, abort; a plain stop: nothing yet |
//! | `release end` | the TAPs are deleted | a migration's destination: abort; a plain stop: the port leaves the host (unbound: the VM runs nowhere; the next start binds it wherever it starts) |
//! | `restore begin` | before a saved VM starts (the XML may be rewritten: dvs prints nothing) | nothing: its `prepare begin` follows |
//! | `reconnect begin` | libvirtd restarted; the VM runs on | nothing (its ports stay as they are) |
//! | `attach begin` | `virsh qemu-attach`, which libvirt 9 no longer has | nothing |
//!
//! A cancelled migration (`migrate_cancel`, or a failure on either side):
//! the source's VM runs on and no hook fires there; the destination's
//! QEMU is stopped, so its `stopped end` and `release end` abort the
//! migration and the source keeps the port.

use dvs_proto::MacAddr;

/// The parts of a domain the hook needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    pub name: String,
    pub interfaces: Vec<Interface>,
}

/// A VM NIC: its MAC and, when given, its host-side device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub mac: MacAddr,
    pub target: Option<String>,
}

/// What an operation means for the domain's ports (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `migrate begin`: an incoming migration begins here: migrate the
    /// ports here, wait for their policy.
    Incoming,
    /// `prepare begin`: the VM is about to start here: its ports must be
    /// here with their policy (migrating here, or bound).
    Prepare,
    /// `start begin`: the VMM made the interfaces the XML names: the ports
    /// take them.
    Plug,
    /// `stopped end`: QEMU is gone (source: the VM runs at the
    /// destination; destination: the incoming migration failed).
    Stopped,
    /// `release end`: the domain's resources are gone (destination: the
    /// incoming migration failed; a plain stop: the port leaves the host).
    Released,
    /// Nothing for the network.
    Nothing,
}

/// Why a hook call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HookError {
    #[error("the domain XML is malformed: {0}")]
    Xml(String),
    #[error("the domain XML's root is <{0}>, expected <domain>")]
    Root(String),
    #[error("the domain XML has no <name>")]
    NoName,
    #[error("interface {index} of the domain XML: {msg}")]
    Interface { index: usize, msg: String },
    #[error("unknown operation `{0}`: libvirt's qemu hook calls prepare, start, started, stopped, release, migrate, restore, reconnect or attach")]
    Operation(String),
}

/// Read the domain XML.
///
/// # Errors
/// [`HookError`] naming what is wrong (the parser's position included).
pub fn parse_domain(xml: &str) -> Result<Domain, HookError> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| HookError::Xml(e.to_string()))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" {
        return Err(HookError::Root(root.tag_name().name().to_string()));
    }
    let name = root
        .children()
        .find(|n| n.has_tag_name("name"))
        .and_then(|n| n.text())
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .ok_or(HookError::NoName)?
        .to_string();
    let mut interfaces = Vec::new();
    let nics = root
        .children()
        .filter(|n| n.has_tag_name("devices"))
        .flat_map(|d| d.children().filter(|n| n.has_tag_name("interface")));
    for (index, nic) in nics.enumerate() {
        let err = |msg: String| HookError::Interface { index, msg };
        let child = |tag: &str, attr: &str| {
            nic.children()
                .find(|n| n.has_tag_name(tag))
                .and_then(|n| n.attribute(attr))
        };
        let mac = child("mac", "address")
            .ok_or_else(|| err("no <mac address=…/>: dvs finds a VM's port by its MAC".into()))?;
        let mac: MacAddr = mac
            .parse()
            .map_err(|e: dvs_proto::Error| err(format!("<mac address='{mac}'>: {e}")))?;
        let target = child("target", "dev").map(str::to_string);
        interfaces.push(Interface { mac, target });
    }
    Ok(Domain { name, interfaces })
}

/// What operation `op` with sub-operation `sub` means.
///
/// # Errors
/// [`HookError::Operation`] for an operation libvirt does not have.
pub fn action(op: &str, sub: &str) -> Result<Action, HookError> {
    Ok(match (op, sub) {
        ("migrate", "begin") => Action::Incoming,
        ("prepare", "begin") => Action::Prepare,
        ("start", "begin") => Action::Plug,
        ("stopped", "end") => Action::Stopped,
        ("release", "end") => Action::Released,
        (
            "prepare" | "start" | "started" | "stopped" | "release" | "migrate" | "restore"
            | "reconnect" | "attach",
            _,
        ) => Action::Nothing,
        _ => return Err(HookError::Operation(op.to_string())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = r#"<domain type='kvm' id='3'>
  <name>web1</name>
  <uuid>1b4e28ba-2fa1-11d2-883f-0016d3cca427</uuid>
  <devices>
    <disk type='file' device='disk'><target dev='vda'/></disk>
    <interface type='ethernet'>
      <mac address='52:54:00:12:34:56'/>
      <target dev='vnet3' managed='no'/>
      <model type='virtio'/>
    </interface>
    <interface type='bridge'>
      <mac address='52:54:00:ab:cd:ef'/>
    </interface>
  </devices>
</domain>"#;

    #[test]
    fn a_domain_gives_its_interfaces() {
        let d = parse_domain(XML).unwrap();
        assert_eq!(d.name, "web1");
        assert_eq!(d.interfaces.len(), 2);
        assert_eq!(d.interfaces[0].mac.to_string(), "52:54:00:12:34:56");
        assert_eq!(d.interfaces[0].target.as_deref(), Some("vnet3"));
        assert_eq!(d.interfaces[1].target, None);
    }

    #[test]
    fn bad_xml_is_refused_with_what_is_wrong() {
        let e = parse_domain("<domain><name>x</name><devices>").unwrap_err();
        assert!(
            e.to_string().starts_with("the domain XML is malformed: "),
            "{e}"
        );
        assert_eq!(
            parse_domain("<network><name>x</name></network>").unwrap_err(),
            HookError::Root("network".into())
        );
        assert_eq!(
            parse_domain("<domain><devices/></domain>").unwrap_err(),
            HookError::NoName
        );
        let e = parse_domain(
            "<domain><name>x</name><devices><interface><mac address='zz'/></interface></devices></domain>",
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("interface 0 of the domain XML: <mac address='zz'>"),
            "{e}"
        );
        let e = parse_domain(
            "<domain><name>x</name><devices><interface type='network'/></devices></domain>",
        )
        .unwrap_err();
        assert!(e.to_string().contains("no <mac"), "{e}");
    }

    #[test]
    fn operations_map_to_actions() {
        assert_eq!(action("migrate", "begin").unwrap(), Action::Incoming);
        assert_eq!(action("prepare", "begin").unwrap(), Action::Prepare);
        assert_eq!(action("started", "begin").unwrap(), Action::Nothing);
        assert_eq!(action("start", "begin").unwrap(), Action::Plug);
        assert_eq!(action("release", "end").unwrap(), Action::Released);
        assert_eq!(action("stopped", "end").unwrap(), Action::Stopped);
        assert_eq!(action("restore", "begin").unwrap(), Action::Nothing);
        assert_eq!(action("reconnect", "begin").unwrap(), Action::Nothing);
        assert!(action("explode", "-")
            .unwrap_err()
            .to_string()
            .contains("`explode`"));
    }
}
