//! `dvs`: one binary for the daemons and the admin commands (argument parsing
//! and dispatch only; the work lives in the crates).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "dvs",
    version,
    about = "dvs — a distributed virtual switch whose port policy moves with the VM",
    long_about = "dvs — a distributed virtual switch whose port policy moves with the VM.\n\n\
                  Start with `dvs lab`: the whole system on one machine, no setup."
)]
struct Cli {
    /// The controller's URL, for admin commands.
    #[arg(
        long,
        global = true,
        env = "DVS_CONTROLLER",
        default_value = "http://127.0.0.1:7700"
    )]
    controller: String,
    /// The controller's admin token, for admin commands.
    #[arg(long, global = true, env = "DVS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The CA of the controller's certificate (an https:// controller).
    #[arg(long, global = true, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// How admin commands print their views.
    #[arg(long, global = true, value_enum, default_value_t = OutputArg::Table)]
    output: OutputArg,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum OutputArg {
    Table,
    Json,
}

/// What `dvs controller` takes.
#[derive(clap::Args, Debug)]
struct ControllerArgs {
    /// Address to serve gRPC on.
    #[arg(long, default_value = "127.0.0.1:7700")]
    listen: std::net::SocketAddr,
    /// Where the embedded store lives (created if missing).
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// Serve Prometheus metrics (text format) at this address.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// Require the token in this file (first line) on admin calls.
    #[arg(long, value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
    /// Serve with TLS: the controller's certificate and key (PEM)...
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_client_ca"])]
    tls_cert: Option<PathBuf>,
    /// ...the key of that certificate (PEM)...
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// ...and the CA whose certificates agents must present (each
    /// naming the host the agent registers).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Abort a migration whose destination port has not found its
    /// interface (the VMM's TAP) this many seconds after it began.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    interface_timeout_s: u64,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the whole system on one machine: an embedded controller, hosts
    /// joined by VXLAN under it, VMs on two VLANs exchanging traffic, a VM
    /// live-migrated to another host and back under a TCP stream and a
    /// ping every 10 ms, then a report with the chassis view and the
    /// migrations' timelines. In process, on a virtual clock: a run is
    /// the same for the same seed.
    Lab {
        /// Print the report as JSON instead of tables.
        #[arg(long)]
        json: bool,
        /// Number of hosts.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(2..=8))]
        hosts: u8,
        /// Seed of the run (the VMs' TCP sequence numbers, which datagrams
        /// the underlay loses): two runs with one seed report the same.
        #[arg(long, default_value_t = dvs_lab::LabOptions::default().seed)]
        seed: u64,
        /// Share of the underlay's datagrams lost, in percent (0 to 50).
        #[arg(long, default_value_t = 0.0, value_parser = parse_loss, conflicts_with = "netns")]
        loss: f64,
        /// Real parts instead (root): `dvs controller` and a `dvs agent`
        /// process per host, VMs as network namespaces on the agents' TAPs
        /// with the kernel's TCP/IP stack, on the real clock.
        #[arg(long)]
        netns: bool,
    },
    /// Run one host's switch (datapath + agent) until SIGTERM.
    #[command(
        long_about = "Run one host's switch (datapath + agent) until SIGTERM or SIGINT.\n\n\
        Under a controller: `dvs agent --controller URL --host NAME --tunnel-ip IP \
        --state-dir DIR` registers the host and runs what the controller sends (ports, \
        policy, segments, where other hosts' VMs are), keeping the last state in DIR so \
        that it forwards when the controller is away, even after a restart. With TLS, \
        add --tls-ca, --tls-cert and --tls-key (a certificate naming the host).\n\n\
        Without a controller, --config FILE: the static file names the host, its VXLAN address, the VLAN segments it \
        stretches to other hosts and the ports (a TAP the agent creates, or an \
        existing interface it attaches to):\n\n\
        host: h1\n\
        tunnel: { local: 10.0.0.1 }\n\
        stats_file: /run/dvs/h1-stats.json\n\
        segments:\n  - { vlan: 10, vni: 5010, peers: [10.0.0.2] }\n\
        monitors:\n  - { name: flows, version: ipfix, collectors: [\"10.0.0.100:4739\"] }\n\
        ports:\n  - { id: veth1, name: web1, tap: dvs-web1, vlan: { mode: access, id: 10 }, netflow: { monitor: flows } }\n  \
        - { id: veth2, name: fw1, netdev: vnet3, vlan: { mode: trunk, allowed: [10, 20-30], native: 10 } }\n\n\
        Ports may also take port profiles from `profiles:` (kind: PortProfile) by name, \
        and NetFlow monitors (v5, v9 or ipfix) from `monitors:`. \
        The whole file is checked before anything is opened. SIGHUP re-reads it and \
        applies changed port policy (VLAN, acl, qos, security, netflow) and segments without a restart; \
        a file that does not validate changes nothing. Logs go to stderr \
        (DVS_LOG=info for more); counters are rewritten to stats_file every second. \
        On SIGTERM the open flow records are exported before the agent exits."
    )]
    Agent {
        /// The host's static YAML file (no controller).
        #[arg(long, value_name = "FILE", conflicts_with_all = ["host", "tunnel_ip", "state_dir"])]
        config: Option<PathBuf>,
        /// Under a controller (`--controller URL`): this host's name.
        #[arg(long, requires_all = ["tunnel_ip", "state_dir"])]
        host: Option<String>,
        /// This host's VXLAN address.
        #[arg(long, value_name = "IP")]
        tunnel_ip: Option<std::net::IpAddr>,
        /// Where the agent keeps the last state it applied (for restarts
        /// while the controller is away).
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Under a controller: write the counters here every second.
        #[arg(long, value_name = "FILE")]
        stats_file: Option<PathBuf>,
        /// Serve Prometheus metrics (text format) at this address.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
        /// Under a TLS controller: this host's certificate (naming the
        /// host) and key, PEM; the controller's CA is --tls-ca.
        #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
        tls_cert: Option<PathBuf>,
        /// ...the key of that certificate (PEM)...
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
    /// Run the controller: the logical chassis, its store and the admin and
    /// agent services.
    Controller(ControllerArgs),
    /// Port profiles and NetFlow monitors (YAML documents).
    #[command(subcommand)]
    Profile(ProfileCmd),
    /// VM ports: IDs vethN that never change.
    #[command(subcommand)]
    Port(PortCmd),
    /// Hosts (the chassis's modules).
    #[command(subcommand)]
    Host(HostCmd),
    /// Chassis-wide views.
    #[command(subcommand)]
    Show(ShowCmd),
    /// Live migrations of ports: drive them by hand (any VMM) or see their
    /// timelines.
    #[command(subcommand)]
    Migrate(MigrateCmd),
    /// VMM hooks.
    #[command(subcommand)]
    Hook(HookCmd),
}

#[derive(Subcommand, Debug)]
enum MigrateCmd {
    /// Begin migrating a port to a host: the destination installs it from
    /// its profile in standby (policy in place, not forwarding). The port
    /// switches over on the VM's first frame at the destination (or its VMM
    /// reading the port's TAP) — the destination then forwards at once,
    /// from the pre-copy — or on `dvs migrate activate`, whichever comes
    /// first.
    Start {
        /// The port (vethN).
        #[arg(long)]
        port: String,
        /// The destination host.
        #[arg(long)]
        to: String,
        /// The port's TAP on the destination (default: the one it has now)...
        #[arg(long, default_value = "")]
        tap: String,
        /// ...or the VMM's interface there (it may not exist yet: the port
        /// waits for it)...
        #[arg(long, default_value = "")]
        netdev: String,
        /// ...or the VMM's interface there, named later (start the
        /// migration again with --netdev once it is).
        #[arg(long)]
        netdev_later: bool,
        /// Return once the destination has the port with its policy (an
        /// error if it was aborted, or after 20 s without it).
        #[arg(long)]
        wait: bool,
    },
    /// The VM resumed on the destination: switch the port over (the source
    /// stops; the destination forwards from its handover, unless it heard
    /// the VM and forwards already).
    Activate {
        /// The migration's ID...
        #[arg(long, default_value_t = 0, required_unless_present = "port")]
        id: u64,
        /// ...or its port.
        #[arg(long, default_value = "")]
        port: String,
    },
    /// Stop a migration: the source keeps (or takes back) the port and
    /// the destination's copy is removed.
    Abort {
        /// The migration's ID...
        #[arg(long, default_value_t = 0, required_unless_present = "port")]
        id: u64,
        /// ...or its port.
        #[arg(long, default_value = "")]
        port: String,
        /// Why (kept in the migration's record).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Every migration with its timeline (ms from its beginning): policy
    /// ready on the destination, when the destination started on its own
    /// (JSON), switchover and its trigger, last frame at
    /// the source, first at the destination, blackout (what the VM's peers
    /// lived through; from and to the VM), frames dropped, snapshot sizes.
    List,
}

#[derive(Subcommand, Debug)]
enum HookCmd {
    /// libvirt's qemu hook: install as /etc/libvirt/hooks/qemu a script
    /// running `exec dvs hook libvirt --host "$(hostname)" "$@"`.
    #[command(
        long_about = "libvirt's qemu hook: libvirt runs /etc/libvirt/hooks/qemu DOMAIN OPERATION SUB-OPERATION EXTRA \
        with the domain XML on stdin; install there a script running\n\n    exec dvs hook libvirt --host \"$(hostname)\" \"$@\"\n\n\
        The calls are taken in libvirt's own order. A start: `prepare begin` binds each interface's port \
        (found by MAC) here with its policy, before libvirt creates the TAP (its name may come only with \
        `start begin`, which gives it to the port); the agent attaches the TAP when it appears. A stop: \
        `release end` unbinds the port (the next start binds it wherever the VM starts). A migration: on the \
        destination `migrate begin` migrates the port here and waits until it is in place with its policy \
        (a failure makes libvirt abort the migration), `start begin` names the destination's TAP; the VM's \
        first frame after resuming, or QEMU reading its TAP, switches the port over; on the source \
        `stopped end` activates the migration if that has not happened yet; on the destination \
        `stopped end`/`release end` abort it (the incoming migration failed or was cancelled). `restore`, \
        `reconnect` and `attach` change nothing. Nothing is printed on stdout (libvirt reads it as a new XML); \
        bad input is refused with one line on stderr and nothing changes."
    )]
    Libvirt {
        /// This host's name, as its agent registers.
        #[arg(long, env = "DVS_HOST")]
        host: String,
        /// Bind interfaces at a plain start as TAPs dvs opens (default:
        /// interfaces libvirt made, attached with AF_PACKET).
        #[arg(long)]
        tap: bool,
        /// The domain (VM) libvirt names.
        domain: String,
        /// libvirt's operation (prepare, start, started, stopped, release,
        /// migrate, restore, reconnect, attach).
        operation: String,
        /// Its sub-operation (begin, end, -).
        sub_operation: String,
        /// libvirt's extra argument (unused).
        #[arg(default_value = "-")]
        extra: String,
    },
}

#[derive(Subcommand, Debug)]
enum ProfileCmd {
    /// Apply a file of PortProfile, NetflowMonitor and PrivateVlan
    /// documents (`---` between them), all or nothing; every bound port
    /// follows.
    Apply {
        /// The YAML file of documents.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        /// Only print what would change.
        #[arg(long)]
        dry_run: bool,
    },
    /// Every profile, monitor and private VLAN.
    List,
    /// One profile, monitor or private VLAN, as applied.
    Show {
        /// The document's name.
        name: String,
    },
    /// Delete a profile, monitor or private VLAN nothing uses.
    Delete {
        /// The document's name.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum PortCmd {
    /// Define a VM port; prints its ID.
    Create {
        /// The VM the port belongs to (a name of the admin's choosing).
        #[arg(long)]
        vm: String,
        /// The VM's MAC on this port (what port security allows).
        #[arg(long)]
        mac: String,
        /// The port profile whose policy the port takes.
        #[arg(long)]
        profile: String,
        /// Bind it at once to this host...
        #[arg(long, default_value = "")]
        host: String,
        /// ...on a TAP the agent creates,
        #[arg(long, default_value = "")]
        tap: String,
        /// ...or on an interface the VMM made.
        #[arg(long, default_value = "")]
        netdev: String,
        /// A static IP binding of the VM (repeatable; v4 or v6): what IP
        /// source guard and ARP/ND inspection allow it.
        #[arg(long = "ip", value_name = "ADDR")]
        ips: Vec<String>,
    },
    /// Replace a port's static IP bindings.
    Set {
        /// The port (vethN).
        id: String,
        /// A static IP binding of the VM (repeatable; v4 or v6).
        #[arg(long = "ip", value_name = "ADDR", required_unless_present = "no_ips")]
        ips: Vec<String>,
        /// Remove every static IP binding.
        #[arg(long, conflicts_with = "ips")]
        no_ips: bool,
    },
    /// Every port.
    List,
    /// One port in detail.
    Show {
        /// The port (vethN).
        id: String,
    },
    /// Delete a port (its host removes it).
    Delete {
        /// The port (vethN).
        id: String,
    },
    /// Put a port on a host (`--host ''` takes it off).
    Bind {
        /// The port (vethN).
        id: String,
        /// The host it goes on ('' takes it off its host).
        #[arg(long)]
        host: String,
        /// A TAP the host's agent creates and owns...
        #[arg(long, default_value = "")]
        tap: String,
        /// ...or an interface the VMM makes (the port waits for it with
        /// its policy in place, and attaches again when it is re-created)...
        #[arg(long, default_value = "")]
        netdev: String,
        /// ...or the VMM's interface, named later (bind again with
        /// --netdev once it is).
        #[arg(long)]
        netdev_later: bool,
    },
}

#[derive(Subcommand, Debug)]
enum HostCmd {
    /// Every host (module): its agent's connection, tunnel address and revisions.
    List,
    /// Put a host in maintenance: no port is bound or migrated to it (its
    /// own stay until moved away; `dvs host list` says "draining").
    Drain {
        /// The host.
        host: String,
        /// End the drain instead.
        #[arg(long)]
        off: bool,
    },
    /// Forget a host with nothing on it (no port bound, none migrating to
    /// or from it, its agent stopped); otherwise say what remains.
    Remove {
        /// The host.
        host: String,
    },
}

#[derive(Subcommand, Debug)]
enum ShowCmd {
    /// Modules and interfaces, like `show module` and `show interface brief`.
    Chassis,
    /// Every port's IP bindings, chassis-wide, with where each came from.
    Ip {
        #[command(subcommand)]
        what: ShowIpCmd,
    },
}

#[derive(Subcommand, Debug)]
enum ShowIpCmd {
    /// The IP bindings of every port: static ones (`dvs port create/set
    /// --ip`) and those DHCP snooping made (as each host last reported).
    Bindings,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dvs: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// `--loss`: a percentage from 0 to 50.
fn parse_loss(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=50.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "`{s}` is not a loss in percent from 0 to 50 (e.g. 0.5)"
        )),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Lab {
            json,
            hosts,
            seed,
            loss,
            netns,
        } => lab(json, hosts, seed, loss, netns),
        Command::Agent {
            config: Some(config),
            metrics,
            ..
        } => {
            let cfg = dvs_switch::agent::config::AgentConfig::load(&config)?;
            dvs_switch::agent::run_with(&cfg, Some(&config), None, metrics)?;
            Ok(())
        }
        Command::Agent {
            config: None,
            host: Some(host),
            tunnel_ip: Some(tunnel_ip),
            state_dir: Some(state_dir),
            stats_file,
            metrics,
            tls_cert,
            tls_key,
        } => {
            let tls = match (tls_cert, tls_key, cli.tls_ca) {
                (Some(cert), Some(key), Some(ca)) => {
                    Some(dvs_switch::agent::remote::ClientTls { ca, cert, key })
                }
                _ => None,
            };
            dvs_switch::agent::remote::run(&dvs_switch::agent::remote::RemoteOptions {
                host,
                controller: cli.controller,
                tunnel_ip,
                state_dir,
                stats_file,
                metrics,
                tls,
            })?;
            Ok(())
        }
        Command::Agent { .. } => anyhow::bail!(
            "give `--config FILE` (a static host) or `--host NAME --tunnel-ip IP --state-dir DIR` (a host under the controller at --controller)"
        ),
        Command::Controller(args) => controller(args),
        Command::Hook(HookCmd::Libvirt {
            host,
            tap,
            domain,
            operation,
            sub_operation,
            extra: _,
        }) => hook(
            &cli.controller,
            cli.token.as_deref(),
            cli.tls_ca.as_deref(),
            dvs_controller::hook::HookCall {
                host,
                domain,
                operation,
                sub_operation,
                xml: String::new(),
                tap,
            },
        ),
        Command::Profile(_)
        | Command::Port(_)
        | Command::Host(_)
        | Command::Show(_)
        | Command::Migrate(_) => {
            admin(
                &cli.controller,
                cli.token.as_deref(),
                cli.tls_ca.as_deref(),
                cli.output,
                cli.command,
            )
        }
    }
}

/// `dvs lab`: run it, print the report, fail when its checks did.
fn lab(json: bool, hosts: u8, seed: u64, loss: f64, netns: bool) -> anyhow::Result<()> {
    let opts = dvs_lab::LabOptions {
        hosts: usize::from(hosts),
        seed,
        loss_ppm: (loss * 10_000.0).round() as u32,
        ..Default::default()
    };
    let report = if netns {
        let me = std::env::current_exe()
            .map_err(|e| anyhow::anyhow!("finding the dvs binary to run its agents: {e}"))?;
        dvs_lab::netns::run(&opts, &me)?
    } else {
        dvs_lab::run(opts)?
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    if !report.ok() {
        anyhow::bail!("the lab's traffic checks failed (see the report above)");
    }
    Ok(())
}

/// `dvs controller`: serve until SIGTERM or SIGINT.
fn controller(args: ControllerArgs) -> anyhow::Result<()> {
    let ControllerArgs {
        listen,
        data_dir,
        metrics,
        admin_token_file,
        tls_cert,
        tls_key,
        tls_client_ca,
        interface_timeout_s,
    } = args;
    let mut c = dvs_controller::server::Controller::open(&data_dir)?
        .with_interface_timeout(std::time::Duration::from_secs(interface_timeout_s.max(1)));
    let tls = match (tls_cert, tls_key, tls_client_ca) {
        (Some(cert), Some(key), Some(client_ca)) => {
            c = c.with_agent_certificates();
            Some(
                dvs_controller::server::TlsFiles {
                    cert,
                    key,
                    client_ca,
                }
                .server_config()?,
            )
        }
        _ => {
            tracing::warn!("no TLS: agents are not authenticated (give --tls-cert, --tls-key, --tls-client-ca)");
            None
        }
    };
    match admin_token_file {
        Some(f) => {
            let text = std::fs::read_to_string(&f)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", f.display()))?;
            let token = text.lines().next().unwrap_or("").trim();
            if token.len() < 16 {
                anyhow::bail!(
                    "{}: the admin token must be at least 16 characters on the first line",
                    f.display()
                );
            }
            c = c.with_admin_token(token);
        }
        None => tracing::warn!(
            "admin calls are not authenticated: give --admin-token-file to require a token"
        ),
    }
    if let Some(addr) = metrics {
        let c = c.clone();
        dvs_metrics::serve(addr, move || c.metrics())
            .map_err(|e| anyhow::anyhow!("serving metrics on {addr}: {e}"))?;
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        tracing::info!(%listen, data_dir = %data_dir.display(), "controller running");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let stop = async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| anyhow::anyhow!("binding {listen}: {e}"))?;
        dvs_controller::server::serve_on(c, listener, tls, stop)
            .await
            .map_err(|e| anyhow::anyhow!("serving on {listen}: {e}"))
    })
}

/// `dvs hook libvirt`: the domain XML on stdin, the report on stderr.
fn hook(
    url: &str,
    token: Option<&str>,
    tls_ca: Option<&std::path::Path>,
    mut call: dvs_controller::hook::HookCall,
) -> anyhow::Result<()> {
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut call.xml)
        .map_err(|e| anyhow::anyhow!("reading the domain XML on stdin: {e}"))?;
    // Bad input is refused before the controller is asked, and
    // operations that do not concern the network need none.
    let (action, _) = dvs_controller::hook::check(&call)?;
    if action == dvs_migrate::libvirt::Action::Nothing {
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let text = rt.block_on(async {
        let mut c = dvs_controller::client::connect(url, token, tls_ca).await?;
        dvs_controller::hook::libvirt(&mut c, &call).await
    })?;
    // libvirt reads stdout of `migrate` as a new domain XML: the
    // report goes to stderr.
    eprint!("{text}");
    Ok(())
}

/// Run an admin command against the controller and print its view.
fn admin(
    url: &str,
    token: Option<&str>,
    tls_ca: Option<&std::path::Path>,
    output: OutputArg,
    cmd: Command,
) -> anyhow::Result<()> {
    use dvs_controller::client::{self, Command as C};
    use dvs_proto::api;
    let c = match cmd {
        Command::Profile(ProfileCmd::Apply { file, dry_run }) => C::ProfileApply {
            yaml: std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?,
            dry_run,
        },
        Command::Profile(ProfileCmd::List) => C::ProfileList,
        Command::Profile(ProfileCmd::Show { name }) => C::ProfileShow(name),
        Command::Profile(ProfileCmd::Delete { name }) => C::ProfileDelete(name),
        Command::Port(PortCmd::Create {
            vm,
            mac,
            profile,
            host,
            tap,
            netdev,
            ips,
        }) => C::PortCreate(api::CreatePortRequest {
            vm,
            mac,
            profile,
            host,
            tap,
            netdev,
            ips,
        }),
        Command::Port(PortCmd::Set { id, ips, no_ips: _ }) => {
            C::PortSetIps(api::SetPortIpsRequest { id, ips })
        }
        Command::Port(PortCmd::List) => C::PortList,
        Command::Port(PortCmd::Show { id }) => C::PortShow(id),
        Command::Port(PortCmd::Delete { id }) => C::PortDelete(id),
        Command::Port(PortCmd::Bind {
            id,
            host,
            tap,
            netdev,
            netdev_later,
        }) => C::PortBind(api::BindPortRequest {
            id,
            host,
            tap,
            netdev,
            netdev_later,
        }),
        Command::Host(HostCmd::List) => C::HostList,
        Command::Host(HostCmd::Drain { host, off }) => C::HostDrain { host, off },
        Command::Host(HostCmd::Remove { host }) => C::HostRemove(host),
        Command::Show(ShowCmd::Chassis) => C::ShowChassis,
        Command::Show(ShowCmd::Ip {
            what: ShowIpCmd::Bindings,
        }) => C::ShowIpBindings,
        Command::Migrate(MigrateCmd::Start {
            port,
            to,
            tap,
            netdev,
            netdev_later,
            wait,
        }) => C::MigrateStart {
            req: api::StartMigrationRequest {
                port,
                to,
                tap,
                netdev,
                netdev_later,
            },
            wait,
        },
        Command::Migrate(MigrateCmd::Activate { id, port }) => {
            C::MigrateActivate(api::MigrationRef {
                id,
                port,
                reason: String::new(),
            })
        }
        Command::Migrate(MigrateCmd::Abort { id, port, reason }) => {
            C::MigrateAbort(api::MigrationRef { id, port, reason })
        }
        Command::Migrate(MigrateCmd::List) => C::MigrateList,
        _ => anyhow::bail!("not an admin command"),
    };
    let out = match output {
        OutputArg::Table => client::Output::Table,
        OutputArg::Json => client::Output::Json,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let text = rt.block_on(client::run(url, token, tls_ca, c, out))?;
    print!("{text}");
    if out == client::Output::Json && !text.ends_with('\n') {
        println!();
    }
    Ok(())
}

/// The error and its causes on one line.
fn one_line(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("DVS_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}
