#!/usr/bin/env bash
# Join this machine to a distlayer Ray cluster as a worker node, with token auth.
#
#   RAY_AUTH_TOKEN=... HEAD=192.168.1.10:6379 NODE_IP=192.168.1.11 bash cluster/join-worker.sh
#
# RAY_AUTH_TOKEN is the head's (start-head.sh prints it; or put it in ~/.ray/auth_token).
# Settings: see cluster/common.sh. Stop it with cluster/stop.sh (only what this started).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=cluster/common.sh
source "$here/common.sh"

[ -n "${HEAD:-}" ] || die "set HEAD to the head's host:port (start-head.sh prints it)"
if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "$HOME/.ray/auth_token" ]; then
    die "set RAY_AUTH_TOKEN to the head's token (start-head.sh prints it), or copy it to ~/.ray/auth_token"
fi

mapfile -t flags < <(node_flags)
start_node "--address=$HEAD" "${flags[@]}"
echo "joined $HEAD (pid $(cat "$PIDFILE"), log $LOGFILE), stores under $DISTLAYER_HOME"
