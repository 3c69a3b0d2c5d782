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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the whole system on one machine: hosts joined by VXLAN, VMs on two
    /// VLANs exchanging traffic, then a report.
    Lab {
        /// Print the report as JSON instead of tables.
        #[arg(long)]
        json: bool,
        /// Number of hosts.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(2..=8))]
        hosts: u8,
    },
    /// Run one host's switch (datapath + agent) until SIGTERM.
    #[command(
        long_about = "Run one host's switch (datapath + agent) until SIGTERM or SIGINT.\n\n\
        The static file names the host, its VXLAN address, the VLAN segments it \
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
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
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

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Lab { json, hosts } => {
            let report = dvs_tests::lab::run(dvs_tests::lab::LabOptions {
                hosts: usize::from(hosts),
                ..Default::default()
            })?;
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
        Command::Agent { config } => {
            let cfg = dvs_switch::config::AgentConfig::load(&config)?;
            dvs_switch::agent::run(&cfg, Some(&config))?;
            Ok(())
        }
    }
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
