//! The admin side of the `dvs` command line: calls to the controller's
//! `Admin` service and their rendering as tables (like NX-OS `show`) or
//! JSON (`--output json`).

use dvs_proto::stats::PortStats;
use std::fmt::Write as _;

use dvs_proto::api::{self, admin_client::AdminClient};
use serde_json::{json, Value};
use tonic::transport::Channel;

use crate::server::MAX_MESSAGE;

/// How views are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

/// An admin command.
#[derive(Debug, Clone)]
pub enum Command {
    ProfileApply {
        yaml: String,
        dry_run: bool,
    },
    ProfileList,
    ProfileShow(String),
    ProfileDelete(String),
    PortCreate(api::CreatePortRequest),
    PortList,
    PortShow(String),
    PortDelete(String),
    PortBind(api::BindPortRequest),
    PortSetIps(api::SetPortIpsRequest),
    HostList,
    /// Put a host in maintenance, or (`off`) take it out.
    HostDrain {
        host: String,
        off: bool,
    },
    HostRemove(String),
    ShowChassis,
    ShowIpBindings,
    /// Begin a migration; with `wait`, return once the destination has the
    /// port with its policy (or the migration ended).
    MigrateStart {
        req: api::StartMigrationRequest,
        wait: bool,
    },
    MigrateActivate(api::MigrationRef),
    MigrateAbort(api::MigrationRef),
    MigrateList,
}

/// Why an admin command failed: the controller's message, or why it could
/// not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the controller at {url}: {msg} (start it with `dvs controller`, or set --controller / DVS_CONTROLLER)")]
    Unreachable { url: String, msg: String },
    #[error("{0}")]
    Refused(String),
}

fn refused(s: tonic::Status) -> ClientError {
    ClientError::Refused(s.message().to_string())
}

/// Adds the admin token to every call.
#[derive(Debug, Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(b) = &self.0 {
            req.metadata_mut().insert("authorization", b.clone());
        }
        Ok(req)
    }
}

/// An admin client.
pub type Admin = AdminClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

/// What an admin client calls through: a gRPC channel to a controller, or
/// an embedded controller's service itself (the lab's, with no network).
pub trait Transport:
    tonic::client::GrpcService<
    tonic::body::Body,
    Error: Into<tonic::codegen::StdError>,
    ResponseBody: tonic::codegen::Body<
        Data = tonic::codegen::Bytes,
        Error: Into<tonic::codegen::StdError> + Send,
    > + Send
                      + 'static,
>
{
}

impl<T> Transport for T where
    T: tonic::client::GrpcService<
        tonic::body::Body,
        Error: Into<tonic::codegen::StdError>,
        ResponseBody: tonic::codegen::Body<
            Data = tonic::codegen::Bytes,
            Error: Into<tonic::codegen::StdError> + Send,
        > + Send
                          + 'static,
    >
{
}

/// Run `cmd` against the controller at `url` (with the admin `token`, if
/// any); returns what to print.
///
/// # Errors
/// [`ClientError`] with the controller's one-line reason.
pub async fn run(
    url: &str,
    token: Option<&str>,
    tls_ca: Option<&std::path::Path>,
    cmd: Command,
    out: Output,
) -> Result<String, ClientError> {
    let mut c = connect(url, token, tls_ca).await?;
    call(&mut c, cmd, out).await
}

/// Connect to the controller's admin service.
///
/// # Errors
/// [`ClientError::Unreachable`], or a token or CA file that cannot be used.
pub async fn connect(
    url: &str,
    token: Option<&str>,
    tls_ca: Option<&std::path::Path>,
) -> Result<Admin, ClientError> {
    let unreachable = |e: &dyn std::fmt::Display| ClientError::Unreachable {
        url: url.to_string(),
        msg: e.to_string(),
    };
    let mut ep = Channel::from_shared(url.to_string()).map_err(|e| unreachable(&e))?;
    if let Some(ca) = tls_ca {
        let pem = std::fs::read(ca)
            .map_err(|e| ClientError::Refused(format!("{}: {e}", ca.display())))?;
        ep = ep
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(pem)),
            )
            .map_err(|e| unreachable(&e))?;
    }
    let ch = ep
        .connect_timeout(std::time::Duration::from_secs(3))
        .connect()
        .await
        .map_err(|e| unreachable(&e))?;
    let bearer: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> = match token {
        Some(t) => Some(format!("Bearer {t}").parse().map_err(|_| {
            ClientError::Refused("the token has characters a header cannot carry".into())
        })?),
        None => None,
    };
    Ok(AdminClient::with_interceptor(ch, Bearer(bearer))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}

/// Run `cmd` on a connected client.
///
/// # Errors
/// [`ClientError::Refused`] with the controller's one-line reason.
pub async fn call<T: Transport>(
    c: &mut AdminClient<T>,
    cmd: Command,
    out: Output,
) -> Result<String, ClientError> {
    let e = api::Empty {};
    Ok(match cmd {
        Command::ProfileApply { yaml, dry_run } => {
            let r = c
                .apply_profiles(api::ApplyRequest { yaml, dry_run })
                .await
                .map_err(refused)?
                .into_inner();
            render_apply(&r, dry_run, out)
        }
        Command::ProfileList => {
            let r = c.list_profiles(e).await.map_err(refused)?.into_inner();
            render_profiles(&r.profiles, out)
        }
        Command::ProfileShow(name) => {
            let p = c
                .get_profile(api::Name { name })
                .await
                .map_err(refused)?
                .into_inner();
            render_profile(&p, out)
        }
        Command::ProfileDelete(name) => {
            let r = c
                .delete_profile(api::Name { name })
                .await
                .map_err(refused)?
                .into_inner();
            match out {
                Output::Json => json!({ "changes": r.changes, "revision": r.revision }).to_string(),
                Output::Table => r.changes.join("\n") + "\n",
            }
        }
        Command::PortCreate(req) => {
            let p = c.create_port(req).await.map_err(refused)?.into_inner();
            match out {
                Output::Json => port_json(&p).to_string(),
                // Scripts take the ID from the first line.
                Output::Table => format!("{}\n", p.id),
            }
        }
        Command::PortList => {
            let r = c.list_ports(e).await.map_err(refused)?.into_inner();
            render_ports(&r.ports, out)
        }
        Command::PortShow(id) => {
            let p = c
                .get_port(api::PortRef { id })
                .await
                .map_err(refused)?
                .into_inner();
            match out {
                Output::Json => port_json(&p).to_string(),
                Output::Table => port_detail(&p),
            }
        }
        Command::PortDelete(id) => {
            c.delete_port(api::PortRef { id: id.clone() })
                .await
                .map_err(refused)?;
            match out {
                Output::Json => json!({ "deleted": id }).to_string(),
                Output::Table => format!("{id}: deleted\n"),
            }
        }
        Command::PortBind(req) => {
            let p = c.bind_port(req).await.map_err(refused)?.into_inner();
            match out {
                Output::Json => port_json(&p).to_string(),
                Output::Table => render_ports(std::slice::from_ref(&p), out),
            }
        }
        Command::PortSetIps(req) => {
            let p = c.set_port_ips(req).await.map_err(refused)?.into_inner();
            match out {
                Output::Json => port_json(&p).to_string(),
                Output::Table => port_detail(&p),
            }
        }
        cmd @ (Command::HostList
        | Command::HostDrain { .. }
        | Command::HostRemove(_)
        | Command::MigrateStart { .. }
        | Command::MigrateActivate(_)
        | Command::MigrateAbort(_)
        | Command::MigrateList) => call_hosts_and_migrations(c, cmd, out).await?,
        Command::ShowIpBindings => {
            let r = c.list_ports(e).await.map_err(refused)?.into_inner();
            render_bindings(&r.ports, out)
        }
        Command::ShowChassis => {
            let r = c.show_chassis(e).await.map_err(refused)?.into_inner();
            match out {
                Output::Json => json!({
                    "revision": r.revision,
                    "modules": r.hosts.iter().map(host_json).collect::<Vec<_>>(),
                    "interfaces": r.ports.iter().map(port_json).collect::<Vec<_>>(),
                })
                .to_string(),
                Output::Table => format!(
                    "chassis revision {}\n\nModules\n{}\nInterfaces\n{}",
                    r.revision,
                    render_hosts(&r.hosts, out),
                    render_ports(&r.ports, out)
                ),
            }
        }
    })
}

/// [`call`]'s host and migration commands.
async fn call_hosts_and_migrations<T: Transport>(
    c: &mut AdminClient<T>,
    cmd: Command,
    out: Output,
) -> Result<String, ClientError> {
    let e = api::Empty {};
    Ok(match cmd {
        Command::HostList => {
            let r = c.list_hosts(e).await.map_err(refused)?.into_inner();
            render_hosts(&r.hosts, out)
        }
        Command::HostDrain { host, off } => {
            let h = c
                .drain_host(api::DrainHostRequest { host, off })
                .await
                .map_err(refused)?
                .into_inner();
            render_hosts(std::slice::from_ref(&h), out)
        }
        Command::HostRemove(name) => {
            c.remove_host(api::Name { name: name.clone() })
                .await
                .map_err(refused)?;
            match out {
                Output::Json => json!({ "removed": name }).to_string(),
                Output::Table => format!("host {name} removed\n"),
            }
        }
        Command::MigrateStart { req, wait } => {
            let mut m = c.start_migration(req).await.map_err(refused)?.into_inner();
            if wait {
                m = wait_prepared(c, m.id).await?;
            }
            render_migrations(std::slice::from_ref(&m), out)
        }
        Command::MigrateActivate(r) => {
            let m = c.activate_migration(r).await.map_err(refused)?.into_inner();
            render_migrations(std::slice::from_ref(&m), out)
        }
        Command::MigrateAbort(r) => {
            let m = c.abort_migration(r).await.map_err(refused)?.into_inner();
            render_migrations(std::slice::from_ref(&m), out)
        }
        Command::MigrateList => {
            let r = c.list_migrations(e).await.map_err(refused)?.into_inner();
            render_migrations(&r.migrations, out)
        }
        other => {
            return Err(ClientError::Refused(format!(
                "{other:?} is not a host or migration command"
            )))
        }
    })
}

fn render_apply(r: &api::ApplyReply, dry_run: bool, out: Output) -> String {
    match out {
        Output::Json => json!({
            "changes": r.changes, "applied": r.applied, "revision": r.revision, "dry_run": dry_run
        })
        .to_string(),
        Output::Table => {
            let mut s = String::new();
            for c in &r.changes {
                let _ = writeln!(s, "{c}");
            }
            if r.changes.is_empty() {
                s.push_str("no change\n");
            } else if dry_run {
                s.push_str("(dry run: nothing applied)\n");
            } else {
                let _ = writeln!(s, "applied: chassis revision {}", r.revision);
            }
            s
        }
    }
}

fn render_profiles(profiles: &[api::Profile], out: Output) -> String {
    match out {
        Output::Json => Value::Array(profiles.iter().map(profile_json).collect()).to_string(),
        Output::Table => {
            let rows: Vec<Vec<String>> = profiles
                .iter()
                .map(|p| {
                    vec![
                        p.name.clone(),
                        p.kind.clone(),
                        p.version.to_string(),
                        p.ports.len().to_string(),
                    ]
                })
                .collect();
            table(&["NAME", "KIND", "VERSION", "PORTS"], &rows)
        }
    }
}

fn render_profile(p: &api::Profile, out: Output) -> String {
    match out {
        Output::Json => profile_json(p).to_string(),
        Output::Table => format!(
            "# {} {} version {} — ports: {}\n{}\n",
            p.kind,
            p.name,
            p.version,
            if p.ports.is_empty() {
                "none".to_string()
            } else {
                p.ports.join(", ")
            },
            p.yaml.trim_end()
        ),
    }
}

fn profile_json(p: &api::Profile) -> Value {
    json!({ "kind": p.kind, "name": p.name, "version": p.version, "yaml": p.yaml, "ports": p.ports })
}

/// A port's last reported line (`None`: no report yet).
fn port_stats(p: &api::Port) -> Option<PortStats> {
    serde_json::from_str(&p.stats_json).ok()
}

fn port_json(p: &api::Port) -> Value {
    let stats = port_stats(p).map_or(Value::Null, |s| json!(s));
    json!({
        "id": p.id, "vm": p.vm, "mac": p.mac, "profile": p.profile,
        "profile_version": p.profile_version, "host": p.host, "tap": p.tap,
        "netdev": p.netdev, "state": p.state().name(), "attachment": p.attachment,
        "vlan": p.vlan, "ips": p.ips, "stats": stats,
    })
}

fn host_json(h: &api::Host) -> Value {
    json!({
        "name": h.name, "module": h.module, "tunnel_ip": h.tunnel_ip,
        "connected": h.connected, "desired_revision": h.desired_revision,
        "acked_revision": h.acked_revision, "lag_seconds": h.lag_seconds, "ports": h.ports,
        "draining": h.draining,
    })
}

fn render_ports(ports: &[api::Port], out: Output) -> String {
    if out == Output::Json {
        return Value::Array(ports.iter().map(port_json).collect()).to_string();
    }
    let rows: Vec<Vec<String>> = ports
        .iter()
        .map(|p| {
            let (rx, tx, drops) = counters(p);
            vec![
                p.id.clone(),
                p.vm.clone(),
                p.mac.clone(),
                format!("{} v{}", p.profile, p.profile_version),
                p.vlan.clone(),
                if p.host.is_empty() {
                    "-".into()
                } else {
                    p.host.clone()
                },
                // What the admin must know: the interface it waits for.
                if p.attachment.is_empty() || p.attachment == "attached" {
                    p.state().name().to_string()
                } else {
                    p.attachment.clone()
                },
                rx,
                tx,
                drops,
            ]
        })
        .collect();
    table(
        &[
            "INTERFACE",
            "VM",
            "MAC",
            "PROFILE",
            "VLAN",
            "HOST",
            "STATE",
            "RX",
            "TX",
            "DROPS",
        ],
        &rows,
    )
}

/// Every port's IP bindings, one row each: the address, whose it is and
/// where it came from — `static` (`--ip`) or `dhcp` (snooped by its host,
/// as it last reported, with the lease left).
fn render_bindings(ports: &[api::Port], out: Output) -> String {
    struct Row<'a> {
        ip: String,
        p: &'a api::Port,
        source: &'static str,
        lease_s: Option<u64>,
    }
    let mut rows = Vec::new();
    for p in ports {
        for ip in &p.ips {
            rows.push(Row {
                ip: ip.clone(),
                p,
                source: "static",
                lease_s: None,
            });
        }
        for b in port_stats(p).map(|s| s.dhcp_bindings).unwrap_or_default() {
            rows.push(Row {
                ip: b.ip.to_string(),
                p,
                source: "dhcp",
                lease_s: Some(b.expires_in_s),
            });
        }
    }
    if out == Output::Json {
        let v = rows
            .iter()
            .map(|r| {
                json!({
                    "ip": r.ip, "mac": r.p.mac, "vlan": r.p.vlan, "port": r.p.id,
                    "vm": r.p.vm, "host": r.p.host, "source": r.source,
                    "expires_in_s": r.lease_s,
                })
            })
            .collect();
        return Value::Array(v).to_string();
    }
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let host = if r.p.host.is_empty() { "-" } else { &r.p.host };
            let lease = r.lease_s.map_or("-".to_string(), |s| format!("{s} s"));
            vec![
                r.ip.clone(),
                r.p.mac.clone(),
                r.p.vlan.clone(),
                r.p.id.clone(),
                r.p.vm.clone(),
                host.to_string(),
                r.source.to_string(),
                lease,
            ]
        })
        .collect();
    table(
        &[
            "IP",
            "MAC",
            "VLAN",
            "INTERFACE",
            "VM",
            "HOST",
            "SOURCE",
            "LEASE LEFT",
        ],
        &rows,
    )
}

/// (rx frames, tx frames, drops) from a port's last report.
fn counters(p: &api::Port) -> (String, String, String) {
    let Some(s) = port_stats(p) else {
        return ("-".into(), "-".into(), "-".into());
    };
    let c = &s.counters;
    let drops = c.drops.total() + c.tx_drops.total();
    (
        c.rx_frames.to_string(),
        c.tx_frames.to_string(),
        drops.to_string(),
    )
}

fn port_detail(p: &api::Port) -> String {
    // "veth2 is up", "veth2 is waiting for interface vnet3", "veth2 is
    // down: interface vnet3 gone".
    let state = match p.attachment.as_str() {
        "" | "attached" => p.state().name().to_string(),
        a if a.starts_with("waiting") => a.to_string(),
        a => format!("down: {a}"),
    };
    let mut s = format!(
        "{} is {}\n  VM {} ({}), profile {} version {}, {}\n  host {}{}\n",
        p.id,
        state,
        p.vm,
        p.mac,
        p.profile,
        p.profile_version,
        if p.vlan.is_empty() {
            "no VLAN"
        } else {
            &p.vlan
        },
        if p.host.is_empty() { "-" } else { &p.host },
        if !p.tap.is_empty() {
            format!(", TAP {}", p.tap)
        } else if !p.netdev.is_empty() {
            format!(", interface {}", p.netdev)
        } else if !p.host.is_empty() {
            ", interface not named yet".to_string()
        } else {
            String::new()
        }
    );
    let snooped: Vec<String> = port_stats(p)
        .map(|st| st.dhcp_bindings)
        .unwrap_or_default()
        .iter()
        .map(|b| format!("{} (dhcp, {} s left)", b.ip, b.expires_in_s))
        .collect();
    if !p.ips.is_empty() || !snooped.is_empty() {
        let all: Vec<String> = p
            .ips
            .iter()
            .map(|ip| format!("{ip} (static)"))
            .chain(snooped)
            .collect();
        let _ = writeln!(s, "  IP bindings: {}", all.join(", "));
    }
    if let Some(st) = port_stats(p) {
        let c = &st.counters;
        let _ = writeln!(
            s,
            "  input: {} frames, {} bytes; output: {} frames, {} bytes",
            c.rx_frames, c.rx_bytes, c.tx_frames, c.tx_bytes
        );
        for (what, d) in [("input drops", &c.drops), ("output drops", &c.tx_drops)] {
            let parts: Vec<String> = d.nonzero().map(|(r, n)| format!("{r} {n}")).collect();
            if !parts.is_empty() {
                let _ = writeln!(s, "  {what}: {}", parts.join(", "));
            }
        }
    }
    s
}

fn render_hosts(hosts: &[api::Host], out: Output) -> String {
    if out == Output::Json {
        return Value::Array(hosts.iter().map(host_json).collect()).to_string();
    }
    let rows: Vec<Vec<String>> = hosts
        .iter()
        .map(|h| {
            vec![
                h.module.to_string(),
                h.name.clone(),
                if h.tunnel_ip.is_empty() {
                    "-".into()
                } else {
                    h.tunnel_ip.clone()
                },
                format!(
                    "{}{}",
                    if h.connected { "ok" } else { "offline" },
                    if h.draining { ", draining" } else { "" }
                ),
                h.ports.to_string(),
                format!("{}/{}", h.acked_revision, h.desired_revision),
                format!("{:.1}s", h.lag_seconds),
            ]
        })
        .collect();
    table(
        &[
            "MOD",
            "HOST",
            "TUNNEL",
            "STATUS",
            "PORTS",
            "APPLIED/DESIRED",
            "LAG",
        ],
        &rows,
    )
}

/// How long [`wait_prepared`] waits for a destination.
pub const PREPARE_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Wait until migration `id`'s destination has the port with its policy
/// (the migration is past preparing); returns the migration then.
///
/// # Errors
/// [`ClientError::Refused`] when it was aborted, is gone, or the
/// destination did not install the port within [`PREPARE_WAIT`].
pub async fn wait_prepared<T: Transport>(
    c: &mut AdminClient<T>,
    id: u64,
) -> Result<api::Migration, ClientError> {
    let until = std::time::Instant::now() + PREPARE_WAIT;
    loop {
        let all = c
            .list_migrations(api::Empty {})
            .await
            .map_err(refused)?
            .into_inner()
            .migrations;
        let Some(m) = all.into_iter().find(|m| m.id == id) else {
            return Err(ClientError::Refused(format!("migration {id} is gone")));
        };
        match m.phase().name() {
            "preparing" if std::time::Instant::now() < until => {}
            "preparing" => {
                return Err(ClientError::Refused(format!(
                    "migration {id}: the destination did not install port {} within {} s",
                    m.port,
                    PREPARE_WAIT.as_secs()
                )))
            }
            "aborted" => {
                return Err(ClientError::Refused(format!(
                    "migration {id} of port {} to {} aborted: {}",
                    m.port, m.to, m.abort_reason
                )))
            }
            _ => return Ok(m),
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Milliseconds from `from` to `to` (both µs since the epoch; 0: not yet).
fn span_ms(from: u64, to: u64) -> Option<f64> {
    (from > 0 && to >= from).then(|| (to - from) as f64 / 1000.0)
}

/// Milliseconds from `begin` to `t` (negative: before it; 0: not yet).
fn since_ms(begin: u64, t: u64) -> Option<f64> {
    (begin > 0 && t > 0).then(|| (t as f64 - begin as f64) / 1000.0)
}

/// A migration's blackout each way — the source's last frame to the
/// destination's first, from the VM and to it — and what its peers lived
/// through (see `dvs_migrate::protocol::Timeline::blackout`), in ms.
pub fn blackouts(m: &api::Migration) -> (Option<f64>, Option<f64>, Option<f64>) {
    let from = span_ms(m.last_frame_source_us, m.first_frame_destination_us);
    let to = span_ms(m.last_to_vm_source_us, m.first_to_vm_destination_us);
    let peers = (m.blackout_us > 0).then(|| m.blackout_us as f64 / 1000.0);
    (from, to, peers)
}

/// A migration's timeline, relative to its beginning, in milliseconds (the
/// source's last frame may come before it: an idle VM).
pub fn migration_json(m: &api::Migration) -> Value {
    let rel = |t: u64| since_ms(m.begin_us, t);
    let (from_vm, to_vm, blackout) = blackouts(m);
    json!({
        "id": m.id, "port": m.port, "vm": m.vm, "from": m.from, "to": m.to,
        "phase": m.phase().name(), "trigger": m.trigger().name(),
        "begin_unix_us": m.begin_us,
        "policy_ready_ms": rel(m.policy_ready_us),
        "switchover_ms": rel(m.switchover_us),
        "destination_started_ms": rel(m.destination_started_us),
        "destination_interface": m.destination_interface,
        "interface_ready_ms": rel(m.interface_ready_us),
        "last_frame_at_source_ms": rel(m.last_frame_source_us),
        "first_frame_at_destination_ms": rel(m.first_frame_destination_us),
        "last_to_vm_at_source_ms": rel(m.last_to_vm_source_us),
        "first_to_vm_at_destination_ms": rel(m.first_to_vm_destination_us),
        "first_to_peer_at_destination_ms": rel(m.first_to_peer_destination_us),
        "done_ms": rel(m.done_us),
        "aborted_ms": rel(m.aborted_us),
        "abort_reason": m.abort_reason,
        "blackout_ms": blackout,
        "blackout_from_vm_ms": from_vm,
        "blackout_to_vm_ms": to_vm,
        "dropped_frames": m.dropped_frames,
        "snapshot_bytes": m.snapshot_bytes,
        "base_snapshot_bytes": m.base_snapshot_bytes,
        "connections": m.connections,
        "flows": m.flows,
    })
}

fn render_migrations(ms: &[api::Migration], out: Output) -> String {
    if out == Output::Json {
        return Value::Array(ms.iter().map(migration_json).collect()).to_string();
    }
    let ms_cell = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
    let rows: Vec<Vec<String>> = ms
        .iter()
        .map(|m| {
            let rel = |t: u64| ms_cell(since_ms(m.begin_us, t));
            let mut phase = m.phase().name().to_string();
            if !m.abort_reason.is_empty() {
                phase = format!("aborted ({})", m.abort_reason);
            }
            vec![
                m.id.to_string(),
                m.port.clone(),
                m.vm.clone(),
                format!("{} -> {}", m.from, m.to),
                rel(m.policy_ready_us),
                rel(m.switchover_us),
                if m.trigger() == api::SwitchoverTrigger::Unspecified {
                    "-".into()
                } else {
                    m.trigger().name().to_string()
                },
                rel(m.last_frame_source_us),
                rel(m.first_frame_destination_us),
                {
                    let (from, to, worst) = blackouts(m);
                    format!("{} ({}/{})", ms_cell(worst), ms_cell(from), ms_cell(to))
                },
                m.dropped_frames.to_string(),
                format!("{:.1}", m.base_snapshot_bytes as f64 / 1024.0),
                format!("{:.1}", m.snapshot_bytes as f64 / 1024.0),
                m.connections.to_string(),
                phase,
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "PORT",
            "VM",
            "HOSTS",
            "POLICY-READY(ms)",
            "SWITCHOVER(ms)",
            "TRIGGER",
            "LAST-AT-SRC(ms)",
            "FIRST-AT-DST(ms)",
            "BLACKOUT(ms: peers (from/to VM))",
            "DROPPED",
            "PRE-COPY(KiB)",
            "HANDOVER(KiB)",
            "CONNS",
            "PHASE",
        ],
        &rows,
    )
}

/// Left-aligned columns.
fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                let _ = write!(s, "{c:<width$}  ", width = w[i]);
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut s = line(head.to_vec());
    for r in rows {
        s += &line(r.iter().map(String::as_str).collect());
    }
    s
}
