#!/usr/bin/env bash
# The cluster's MLflow tracking server (cluster.yaml and cluster-gcp.yaml run it on the head), behind
# MLflow's basic-auth app: every request needs the cluster's MLflow credentials (credentials.sh), so nobody
# who merely reaches port 5000 can read runs, register a version or move an alias.
#
#   bash deploy/mlflow/server.sh ARTIFACTS_DESTINATION [more mlflow server options]
#   e.g. bash deploy/mlflow/server.sh s3://raylm-runs/mlflow
#
# It listens on all interfaces because Ray Train workers, Tune trials, eval actors and Serve replicas on
# the worker nodes use it too (docs/clusters.md, "The MLflow server"). Options after the destination
# override the defaults (e.g. --host 127.0.0.1 --port 5001).
#
# State lives in ~/mlflow: the tracking store mlflow.db and the account store basic_auth.db. The account
# store is rebuilt at every start, so that its one account (raylm) has the password that the current Ray
# token gives; accounts added through MLflow's API do not outlive a restart.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
artifacts=${1:?usage: server.sh ARTIFACTS_DESTINATION [more mlflow server options]}
shift
. "$here/credentials.sh"
mkdir -p "$HOME/mlflow"
cd "$HOME/mlflow"
rm -f basic_auth.db
export MLFLOW_AUTH_CONFIG_PATH="$here/basic_auth.ini"
export MLFLOW_AUTH_ADMIN_USERNAME="$MLFLOW_TRACKING_USERNAME" MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_TRACKING_PASSWORD"
MLFLOW_FLASK_SERVER_SECRET_KEY=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
export MLFLOW_FLASK_SERVER_SECRET_KEY
exec mlflow server --app-name basic-auth --host 0.0.0.0 --port 5000 \
    --backend-store-uri "sqlite:///$HOME/mlflow/mlflow.db" --artifacts-destination "$artifacts" "$@"
