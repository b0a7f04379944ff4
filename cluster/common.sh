# Shared by the cluster scripts (sourced, not run): settings with their defaults and
# how a node is started in the background and stopped again.
#
# Settings (environment variables):
#   DISTLAYER_HOME      where this node keeps its layer stores (default ~/.cache/distlayer);
#                       stages on this node inherit it from `ray start`
#   DISTLAYER_CLUSTER   where the scripts keep their state: pid, log
#                       (default $DISTLAYER_HOME/cluster)
#   RAY_TEMP            the node's Ray temp dir (default /tmp/distlayer-ray-$UID: Ray's
#                       socket paths under it must stay under 108 bytes)
#   RAY                 the ray command (default: ray on PATH)
#   NODE_IP             this node's address the others reach (default: Ray's guess)
#   NUM_CPUS, NUM_GPUS  what the node offers (default: what Ray detects)
#   RESOURCES           custom resources as JSON, e.g. '{"node_a": 1}' to pin a stage here
#   RAY_PORT            the head's port (default 6379)

DISTLAYER_HOME=${DISTLAYER_HOME:-$HOME/.cache/distlayer}
DISTLAYER_CLUSTER=${DISTLAYER_CLUSTER:-$DISTLAYER_HOME/cluster}
RAY=${RAY:-ray}
RAY_PORT=${RAY_PORT:-6379}
RAY_TEMP=${RAY_TEMP:-/tmp/distlayer-ray-$(id -u)}
export DISTLAYER_HOME RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}

PIDFILE=$DISTLAYER_CLUSTER/ray.pid
LOGFILE=$DISTLAYER_CLUSTER/ray.log

# Fixed ports, so a firewall can let exactly these through between the nodes.
NODE_MANAGER_PORT=${NODE_MANAGER_PORT:-6380}
OBJECT_MANAGER_PORT=${OBJECT_MANAGER_PORT:-6381}
RUNTIME_ENV_AGENT_PORT=${RUNTIME_ENV_AGENT_PORT:-6382}
DASHBOARD_AGENT_GRPC_PORT=${DASHBOARD_AGENT_GRPC_PORT:-6383}
DASHBOARD_AGENT_LISTEN_PORT=${DASHBOARD_AGENT_LISTEN_PORT:-6384}
METRICS_EXPORT_PORT=${METRICS_EXPORT_PORT:-6385}
MIN_WORKER_PORT=${MIN_WORKER_PORT:-10002}
MAX_WORKER_PORT=${MAX_WORKER_PORT:-10999}

die() {
    echo "error: $*" >&2
    exit 2
}

# The `ray start` flags every node gets.
node_flags() {
    local flags=(--disable-usage-stats "--temp-dir=$RAY_TEMP"
        "--node-manager-port=$NODE_MANAGER_PORT" "--object-manager-port=$OBJECT_MANAGER_PORT"
        "--runtime-env-agent-port=$RUNTIME_ENV_AGENT_PORT"
        "--dashboard-agent-grpc-port=$DASHBOARD_AGENT_GRPC_PORT"
        "--dashboard-agent-listen-port=$DASHBOARD_AGENT_LISTEN_PORT"
        "--metrics-export-port=$METRICS_EXPORT_PORT"
        "--min-worker-port=$MIN_WORKER_PORT" "--max-worker-port=$MAX_WORKER_PORT")
    [ -n "${NODE_IP:-}" ] && flags+=("--node-ip-address=$NODE_IP")
    [ -n "${NUM_CPUS:-}" ] && flags+=("--num-cpus=$NUM_CPUS")
    [ -n "${NUM_GPUS:-}" ] && flags+=("--num-gpus=$NUM_GPUS")
    [ -n "${RESOURCES:-}" ] && flags+=("--resources=$RESOURCES")
    printf '%s\n' "${flags[@]}"
}

# Refuse to start a second node from the same state dir.
check_not_running() {
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        die "a node started by these scripts is already running (pid $(cat "$PIDFILE")): run cluster/stop.sh first"
    fi
}

# start_node FLAGS...: `ray start --block FLAGS...` in its own session, in the background;
# its pid goes to $PIDFILE. Returns once the node is up (or fails with its log).
start_node() {
    mkdir -p "$DISTLAYER_CLUSTER" "$DISTLAYER_HOME"
    check_not_running
    setsid "$RAY" start --block "$@" >"$LOGFILE" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
    local waited=0
    until grep -q "Ray runtime started" "$LOGFILE" 2>/dev/null; do
        if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
            rm -f "$PIDFILE"
            cat "$LOGFILE" >&2
            die "ray start failed (its output is above and in $LOGFILE)"
        fi
        [ "$waited" -ge "${START_TIMEOUT:-180}" ] && die "the node did not start within ${START_TIMEOUT:-180}s: see $LOGFILE"
        sleep 1
        waited=$((waited + 1))
    done
}
