//! `dvs hook libvirt`: libvirt's qemu hook carried out against the
//! controller (what each operation means, in libvirt's own order, is
//! `dvs_migrate::libvirt`'s). Ports are found by the MACs of the domain's
//! interfaces. Every step that changes a host waits until that host's
//! agent applied it: when the hook returns, the port is there with its
//! policy.

use std::time::{Duration, Instant};

use dvs_migrate::libvirt::{self, Action};
use dvs_proto::api;

use crate::client::{Admin, ClientError};

/// How long a host may take to apply what the hook asked.
pub const APPLY_TIMEOUT: Duration = Duration::from_secs(15);

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

/// Carry out a hook call; returns what to report (one line per port acted
/// on). Every interface's port is found before anything changes: a MAC no
/// port has refuses the whole call.
///
/// # Errors
/// [`ClientError::Refused`] naming the problem: libvirt then fails the
/// operation (a start or a migration is aborted).
pub async fn libvirt(c: &mut Admin, call: &HookCall) -> Result<String, ClientError> {
    let (action, domain) = check(call)?;
    if action == Action::Nothing || domain.interfaces.is_empty() {
        return Ok(String::new());
    }
    let all = c
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
    let mut ports = Vec::new();
    for nic in &domain.interfaces {
        let mac = nic.mac.to_string();
        let Some(port) = all.iter().find(|p| p.mac == mac) else {
            return Err(ClientError::Refused(format!(
                "no port has MAC {mac} (domain {}): create it with `dvs port create --mac {mac}`",
                domain.name
            )));
        };
        let open = migrations
            .iter()
            .find(|m| m.port == port.id && !m.phase().is_over())
            .cloned();
        ports.push((nic, port.clone(), open));
    }
    let mut out = String::new();
    for (nic, port, open) in ports {
        let here = call.host.as_str();
        let line = match (action, &open) {
            (Action::Incoming, Some(m)) if m.to == here => {
                set_interface(c, &port, here, nic.target.as_deref()).await?;
                wait_ready(c, m.id).await?
            }
            (Action::Incoming | Action::Prepare | Action::Plug, Some(m)) if m.to != here => {
                return Err(ClientError::Refused(format!(
                    "port {} is migrating from {} to {} (migration {}): the VM cannot start here",
                    port.id, m.from, m.to, m.id
                )))
            }
            (Action::Incoming, None) if port.host == here => {
                format!("{}: on {here} already", port.id)
            }
            (Action::Incoming, None) => {
                let m = c
                    .start_migration(start_request(&port, here, nic.target.as_deref()))
                    .await
                    .map_err(refused)?
                    .into_inner();
                wait_ready(c, m.id).await?
            }
            (Action::Prepare, Some(m)) => wait_ready(c, m.id).await?,
            (Action::Plug, Some(m)) => {
                set_interface(c, &port, here, nic.target.as_deref()).await?;
                format!(
                    "{}: migration {} takes interface {}",
                    port.id,
                    m.id,
                    nic.target.as_deref().unwrap_or("-")
                )
            }
            (Action::Prepare | Action::Plug, None) => {
                bind_here(c, call, &port, nic.target.as_deref()).await?
            }
            (Action::Stopped, Some(m)) if m.from == here => {
                // libvirt stops the source once the destination resumed.
                let r = api::MigrationRef {
                    id: m.id,
                    ..Default::default()
                };
                let m = c.activate_migration(r).await.map_err(refused)?.into_inner();
                format!("{}: migration {} {}", port.id, m.id, m.phase().name())
            }
            (Action::Stopped | Action::Released, Some(m)) if m.to == here => {
                let r = api::MigrationRef {
                    id: m.id,
                    port: String::new(),
                    reason: format!(
                        "libvirt stopped domain {} on the destination: the incoming migration failed",
                        domain.name
                    ),
                };
                let m = c.abort_migration(r).await.map_err(refused)?.into_inner();
                format!("{}: migration {} {}", port.id, m.id, m.phase().name())
            }
            (Action::Released, None) if port.host == here => {
                // The VM is off: its port runs nowhere until it starts again.
                c.bind_port(api::BindPortRequest {
                    id: port.id.clone(),
                    ..Default::default()
                })
                .await
                .map_err(refused)?;
                format!("{}: unbound from {here} (domain stopped)", port.id)
            }
            _ => continue,
        };
        out.push_str(&line);
        out.push('\n');
    }
    Ok(out)
}

/// A migration of `port` to `host` on the interface the XML names (none:
/// named later, at `start begin`).
fn start_request(port: &api::Port, host: &str, target: Option<&str>) -> api::StartMigrationRequest {
    let (mut tap, mut netdev) = (String::new(), String::new());
    match target {
        // The same kind of device as at the source.
        Some(t) if !port.tap.is_empty() => tap = t.to_string(),
        Some(t) => netdev = t.to_string(),
        None => {}
    }
    api::StartMigrationRequest {
        port: port.id.clone(),
        to: host.to_string(),
        netdev_later: tap.is_empty() && netdev.is_empty(),
        tap,
        netdev,
    }
}

/// Give the migration of `port` to `host` the interface the XML names.
async fn set_interface(
    c: &mut Admin,
    port: &api::Port,
    host: &str,
    target: Option<&str>,
) -> Result<(), ClientError> {
    if target.is_none() {
        return Ok(());
    }
    c.start_migration(start_request(port, host, target))
        .await
        .map_err(refused)?;
    Ok(())
}

/// Bind `port` here on the interface the XML names (none yet: named at
/// `start begin`) and wait until this host applied it. A port bound on
/// another host moves here only when its interface is not attached there
/// (its VM does not run there).
async fn bind_here(
    c: &mut Admin,
    call: &HookCall,
    port: &api::Port,
    target: Option<&str>,
) -> Result<String, ClientError> {
    let here = call.host.as_str();
    let (tap, netdev, later) = match target {
        Some(t) if call.tap => (t.to_string(), String::new(), false),
        Some(t) => (String::new(), t.to_string(), false),
        None => (String::new(), String::new(), true),
    };
    let same = port.host == here
        && ((later && port.tap.is_empty() && port.netdev.is_empty())
            || (!later && port.tap == tap && port.netdev == netdev));
    if !port.host.is_empty() && port.host != here && port.state() == api::PortState::Up {
        return Err(ClientError::Refused(format!(
            "port {} runs on host {} ({}): stop the VM there or migrate it rather than start it here",
            port.id,
            port.host,
            if port.attachment.is_empty() {
                "attached"
            } else {
                &port.attachment
            }
        )));
    }
    if !same {
        c.bind_port(api::BindPortRequest {
            id: port.id.clone(),
            host: here.to_string(),
            tap,
            netdev,
            netdev_later: later,
        })
        .await
        .map_err(refused)?;
    }
    wait_applied(c, here).await?;
    let moved = if !port.host.is_empty() && port.host != here {
        format!(" (from {})", port.host)
    } else {
        String::new()
    };
    Ok(match target {
        Some(t) => format!("{}: bound to {here}{moved}, interface {t}", port.id),
        None => format!(
            "{}: bound to {here}{moved}, its interface named at start",
            port.id
        ),
    })
}

/// Wait until `host`'s agent applied the chassis's latest state for it.
async fn wait_applied(c: &mut Admin, host: &str) -> Result<(), ClientError> {
    let end = Instant::now() + APPLY_TIMEOUT;
    let mut want = None;
    loop {
        let hosts = c
            .list_hosts(api::Empty {})
            .await
            .map_err(refused)?
            .into_inner()
            .hosts;
        let Some(h) = hosts.iter().find(|h| h.name == host) else {
            return Err(ClientError::Refused(format!(
                "host {host} is not in the chassis: start its agent (dvs agent --host {host})"
            )));
        };
        let want = *want.get_or_insert(h.desired_revision);
        if h.acked_revision >= want {
            return Ok(());
        }
        if Instant::now() >= end {
            return Err(ClientError::Refused(format!(
                "host {host} did not apply revision {want} within {} s (it runs {}; {}): see its agent's log",
                APPLY_TIMEOUT.as_secs(),
                h.acked_revision,
                if h.connected {
                    "connected"
                } else {
                    "its agent is not connected"
                }
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait until migration `id`'s destination has the port with its policy;
/// the line to print.
async fn wait_ready(c: &mut Admin, id: u64) -> Result<String, ClientError> {
    let m = crate::client::wait_prepared(c, id).await?;
    Ok(format!(
        "{}: migration {id} {}, policy in place on {}",
        m.port,
        m.phase().name(),
        m.to
    ))
}
