#!/usr/bin/env bash
# Instance profiles for cluster.yaml with access to the run bucket's prefixes only (docs/clusters.md).
#
#   bash deploy/iam/aws-setup.sh
#
# raylm-head:   aws-head-policy.json: read-write runs/ and mlflow/ of s3://raylm-runs, read corpora/; what
#               Ray's autoscaler needs (describe, launch, tag, stop/start/terminate this cluster's nodes
#               only), and passing the raylm-worker role to the workers it launches, no other role.
# raylm-worker: aws-worker-policy.json: read-write runs/, read corpora/. No EC2, no other bucket or prefix.
# Another bucket name: change raylm-runs in both policy files first (and in cluster.yaml, jobs/configs).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
account=$(aws sts get-caller-identity --query Account --output text)
for role in raylm-head raylm-worker; do
    aws iam create-role --role-name "$role" --assume-role-policy-document "file://$here/aws-ec2-trust.json"
    aws iam create-policy --policy-name "$role" --policy-document "file://$here/aws-${role#raylm-}-policy.json"
    aws iam attach-role-policy --role-name "$role" --policy-arn "arn:aws:iam::${account}:policy/${role}"
    aws iam create-instance-profile --instance-profile-name "$role"
    aws iam add-role-to-instance-profile --instance-profile-name "$role" --role-name "$role"
done
