//! `dvs hook libvirt`: libvirt's qemu hook carried out against the
//! controller (what each operation means is `dvs_migrate::libvirt`'s).
//! Ports are found by the MACs of the domain's interfaces.

use dvs_migrate::libvirt::{self, Action};
use dvs_proto::api;

use crate::client::{Admin, ClientError};

/// How the hook was called.
#[derive(Debug, Clone)]
pub struct HookCall {
    /// This host's name (as its agent registers).
    pub host: String,
    pub domain: String,
    pub operation: String,
    pub sub_operation: String,
    /// The domain XML (stdin).
    pub xml: String,
    /// Interfaces bound at a plain start are `netdev` (libvirt made them)
    /// unless this says `tap`.
    pub tap: bool,
}

/// What the call means and the domain it is about — checked before the
/// controller is asked anything.
///
/// # Errors
/// [`ClientError::Refused`] for an unknown operation or a bad domain XML.
pub fn check(call: &HookCall) -> Result<(Action, libvirt::Domain), ClientError> {
    let action = libvirt::action(&call.operation, &call.sub_operation)
        .map_err(|e| ClientError::Refused(e.to_string()))?;
    let domain =
        libvirt::parse_domain(&call.xml).map_err(|e| ClientError::Refused(e.to_string()))?;
    if domain.name != call.domain {
        return Err(ClientError::Refused(format!(
            "the hook is called for domain `{}` but the XML is of `{}`",
            call.domain, domain.name
        )));
    }
    Ok((action, domain))
}

fn refused(s: tonic::Status) -> ClientError {
    ClientError::Refused(s.message().to_string())
}

/// Carry out a hook call; returns what to print (one line per port acted
/// on). Nothing is changed when the XML or the operation is refused.
///
/// # Errors
/// [`ClientError::Refused`] naming the problem: libvirt then fails the
/// operation (a migration is aborted).
pub async fn libvirt(c: &mut Admin, call: &HookCall) -> Result<String, ClientError> {
    let (action, domain) = check(call)?;
    if action == Action::Nothing || domain.interfaces.is_empty() {
        return Ok(String::new());
    }
    let ports = c
        .list_ports(api::Empty {})
        .await
        .map_err(refused)?
        .into_inner()
        .ports;
    let migrations = c
        .list_migrations(api::Empty {})
        .await
        .map_err(refused)?
        .into_inner()
        .migrations;
    let mut out = String::new();
    for nic in &domain.interfaces {
        let mac = nic.mac.to_string();
        let Some(port) = ports.iter().find(|p| p.mac == mac) else {
            return Err(ClientError::Refused(format!(
                "no port has MAC {mac} (domain {}): create it with `dvs port create --mac {mac}`",
                domain.name
            )));
        };
        let open = migrations
            .iter()
            .find(|m| m.port == port.id && !matches!(m.phase.as_str(), "done" | "aborted"));
        let line = match action {
            Action::Incoming => match open {
                Some(m) if m.to == call.host => wait_ready(c, m.id).await?,
                Some(m) => {
                    return Err(ClientError::Refused(format!(
                        "port {} is migrating to {} (migration {}), not here",
                        port.id, m.to, m.id
                    )))
                }
                None if port.host == call.host => format!("{}: on {} already", port.id, call.host),
                None => {
                    let (mut tap, mut netdev) = (String::new(), String::new());
                    if let Some(t) = &nic.target {
                        // The same kind of device as at the source.
                        if port.tap.is_empty() {
                            netdev.clone_from(t);
                        } else {
                            tap.clone_from(t);
                        }
                    }
                    let m = c
                        .start_migration(api::StartMigrationRequest {
                            port: port.id.clone(),
                            to: call.host.clone(),
                            tap,
                            netdev,
                        })
                        .await
                        .map_err(refused)?
                        .into_inner();
                    wait_ready(c, m.id).await?
                }
            },
            Action::Prepare => match open {
                Some(m) if m.to == call.host => wait_ready(c, m.id).await?,
                Some(m) => {
                    return Err(ClientError::Refused(format!(
                    "port {} is migrating from {} to {} (migration {}): the VM cannot start here",
                    port.id, m.from, m.to, m.id
                )))
                }
                None if port.host == call.host => format!("{}: bound here", port.id),
                None if port.host.is_empty() => {
                    let dev = nic.target.clone().ok_or_else(|| {
                        ClientError::Refused(format!(
                            "interface {mac} has no <target dev=…/>: dvs needs the device to bind port {} here",
                            port.id
                        ))
                    })?;
                    let (tap, netdev) = if call.tap {
                        (dev, String::new())
                    } else {
                        (String::new(), dev)
                    };
                    c.bind_port(api::BindPortRequest {
                        id: port.id.clone(),
                        host: call.host.clone(),
                        tap,
                        netdev,
                    })
                    .await
                    .map_err(refused)?;
                    format!("{}: bound to {}", port.id, call.host)
                }
                None => {
                    return Err(ClientError::Refused(format!(
                        "port {} runs on host {}: migrate the VM rather than start it here",
                        port.id, port.host
                    )))
                }
            },
            Action::Released => match open {
                Some(m) if m.from == call.host => {
                    // The VM stopped here because it runs at the destination.
                    let r = api::MigrationRef {
                        id: m.id,
                        ..Default::default()
                    };
                    let m = c.activate_migration(r).await.map_err(refused)?.into_inner();
                    format!("{}: migration {} {}", port.id, m.id, m.phase)
                }
                Some(m) if m.to == call.host => {
                    let r = api::MigrationRef {
                        id: m.id,
                        port: String::new(),
                        reason: format!(
                            "libvirt released domain {} on the destination",
                            domain.name
                        ),
                    };
                    let m = c.abort_migration(r).await.map_err(refused)?.into_inner();
                    format!("{}: migration {} {}", port.id, m.id, m.phase)
                }
                _ => continue,
            },
            Action::Nothing => continue,
        };
        out.push_str(&line);
        out.push('\n');
    }
    Ok(out)
}

/// Wait until migration `id`'s destination has the port with its policy;
/// the line to print.
async fn wait_ready(c: &mut Admin, id: u64) -> Result<String, ClientError> {
    let m = crate::client::wait_prepared(c, id).await?;
    Ok(format!(
        "{}: migration {id} {}, policy in place on {}",
        m.port, m.phase, m.to
    ))
}
