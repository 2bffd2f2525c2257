#!/usr/bin/env bash
# The two pages a user reviews, as a headless Chromium shows them: a search's leaderboard.html and `mlflow ui`
# on the same store. Usage (from the checkout, after a search):
#   bash docs/screens/take.sh <search name> [tracking uri, default sqlite:///mlflow.db]
# Needs chromium (`apt-get install chromium`). mlflow ui binds 127.0.0.1 on a free port and is stopped by its PID.
set -euo pipefail
search=$1
uri=${2:-sqlite:///mlflow.db}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
shoot() { chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="$1" \
    --virtual-time-budget=20000 --screenshot="$2" "$3" >/dev/null 2>&1; }

python -m kdsearch.leaderboard search="$search" tracking.uri="$uri" out="$work/board" | tail -1
shoot 1280,1400 "$here/leaderboard.png" "file://$work/board/leaderboard.html"

port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mlflow ui --backend-store-uri "$uri" --host 127.0.0.1 --port "$port" >"$work/ui.log" 2>&1 &
ui=$!
trap 'kill $ui 2>/dev/null || true' EXIT
for _ in $(seq 60); do curl -sf -o /dev/null "http://127.0.0.1:$port/" && break; sleep 1; done
experiment=$(python -c "from kdsearch.tracking import open_client; print(open_client('$uri', 'kdsearch', create=False)[1])")
# MLflow 3.17's UI opens an experiment on the GenAI overview in a fresh browser (its GenAI/Model training switch
# is the browser's own setting): the runs table is this address, or "Model training" at the top left
shoot 1400,900 "$here/mlflow_runs.png" "http://127.0.0.1:$port/#/experiments/$experiment/runs?workflowType=machine_learning"
echo "screenshots in $here (leaderboard.png, mlflow_runs.png)"
