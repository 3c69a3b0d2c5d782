#!/usr/bin/env bash
# dvs against a Linux bridge and Open vSwitch's userspace datapath, on real
# kernels: see bench/netns_bench.py. Needs root. Arguments go to the script
# (--rounds N, --secs S, --only 1,5, --json).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v iperf3 >/dev/null || need+=(iperf3)
command -v ping >/dev/null || need+=(iputils-ping)
command -v ovs-vswitchd >/dev/null || need+=(openvswitch-switch)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
cargo build --release --bin dvs
exec /usr/bin/python3 bench/netns_bench.py --dvs target/release/dvs "$@"
