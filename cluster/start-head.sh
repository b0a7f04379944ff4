#!/usr/bin/env bash
# Start a Ray head node for distlayer on this machine, with token auth.
#
#   NODE_IP=192.168.1.10 bash cluster/start-head.sh
#
# Prints the address and token workers join with, and the ports to open between nodes.
# Settings: see cluster/common.sh. Stop it with cluster/stop.sh (only what this started).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=cluster/common.sh
source "$here/common.sh"

if [ -z "${RAY_AUTH_TOKEN:-}" ]; then  # the token in ~/.ray/auth_token, made once
    RAY_AUTH_TOKEN=$("$RAY" get-auth-token --generate 2>/dev/null) || die "ray get-auth-token failed: is ray installed?"
fi
export RAY_AUTH_TOKEN

mapfile -t flags < <(node_flags)
start_node --head "--port=$RAY_PORT" --include-dashboard=false "${flags[@]}"

ip=${NODE_IP:-$(hostname -I | awk '{print $1}')}
cat <<MSG
Ray head started (pid $(cat "$PIDFILE"), log $LOGFILE), stores under $DISTLAYER_HOME.

Join each worker machine with:
    RAY_AUTH_TOKEN=$RAY_AUTH_TOKEN HEAD=$ip:$RAY_PORT bash cluster/join-worker.sh

Open these TCP ports between all nodes: $RAY_PORT (head only), $NODE_MANAGER_PORT-$METRICS_EXPORT_PORT,
$MIN_WORKER_PORT-$MAX_WORKER_PORT, and the ephemeral range (cat /proc/sys/net/ipv4/ip_local_port_range)
for distlayer's stage-to-stage hand-offs.
MSG
