# Source this file (`. deploy/mlflow/credentials.sh`) to get the credentials of a raylm cluster's MLflow
# server: it sets MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, which every MLflow client reads
# (raylm, Ray Train workers, Serve replicas, eval actors, the mlflow CLI, and the server below).
#
# cluster.yaml sources it on the head and on every worker before `ray start`, so every Ray process has them;
# you source it on your machine to use the server through a forwarded port (docs/clusters.md).
#
# The password is derived from the Ray cluster token ($RAY_AUTH_TOKEN, else the file at
# $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token: the file cluster.yaml already mounts on every node), so there
# is no second secret to distribute, and whoever holds the token can run code on the cluster anyway. The
# token itself never reaches MLflow: only SHA-256("raylm-mlflow:" + token) does. The value goes through
# shell built-ins and pipes, never onto a command line.

_raylm_mlflow_token=${RAY_AUTH_TOKEN:-}
if [ -z "$_raylm_mlflow_token" ] && [ -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; then
    _raylm_mlflow_token=$(cat "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}")
fi
if [ -z "$_raylm_mlflow_token" ]; then
    echo "error: no Ray cluster token (\$RAY_AUTH_TOKEN or ${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}); run \`ray get-auth-token --generate\` first" >&2
    unset _raylm_mlflow_token
    return 1 2>/dev/null || exit 1
fi
if command -v sha256sum >/dev/null 2>&1; then
    MLFLOW_TRACKING_PASSWORD=$(printf 'raylm-mlflow:%s' "$_raylm_mlflow_token" | sha256sum | cut -d' ' -f1)
else  # macOS
    MLFLOW_TRACKING_PASSWORD=$(printf 'raylm-mlflow:%s' "$_raylm_mlflow_token" | shasum -a 256 | cut -d' ' -f1)
fi
unset _raylm_mlflow_token
export MLFLOW_TRACKING_USERNAME=raylm MLFLOW_TRACKING_PASSWORD
