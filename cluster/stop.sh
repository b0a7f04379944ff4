#!/usr/bin/env bash
# Stop the Ray node that start-head.sh or join-worker.sh started on this machine, and
# nothing else: the recorded `ray start --block` process, which stops its node, then
# what is left of its process group. (Never `ray stop`: it ends every Ray process on
# the machine.)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=cluster/common.sh
source "$here/common.sh"

[ -f "$PIDFILE" ] || die "no $PIDFILE: nothing was started from $DISTLAYER_CLUSTER"
pid=$(cat "$PIDFILE")
if kill -TERM "$pid" 2>/dev/null; then
    for _ in $(seq 1 30); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
fi
kill -KILL -- "-$pid" 2>/dev/null || true  # its session's process group, if anything is left
rm -f "$PIDFILE"
echo "stopped the node of pid $pid"
