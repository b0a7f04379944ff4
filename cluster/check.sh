#!/usr/bin/env bash
# Show the cluster: its nodes and resources (`ray status`), and with a model the plan
# distlayer would run on it (`distlayer plan MODEL --address HEAD`).
#
#   HEAD=192.168.1.10:6379 bash cluster/check.sh [MODEL [distlayer plan flags...]]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=cluster/common.sh
source "$here/common.sh"

address=${HEAD:-127.0.0.1:$RAY_PORT}
"$RAY" status --address "$address"
if [ "$#" -gt 0 ]; then
    model=$1
    shift
    "${DISTLAYER:-distlayer}" plan "$model" --address "$address" "$@"
fi
