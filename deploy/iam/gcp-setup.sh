#!/usr/bin/env bash
# Service accounts for cluster-gcp.yaml with access to the run bucket's prefixes only (docs/clusters.md).
#
#   bash deploy/iam/gcp-setup.sh PROJECT [BUCKET]      # BUCKET defaults to raylm-runs
#
# raylm-head:   read-write runs/ and mlflow/, read corpora/; Ray's autoscaler (the raylmAutoscaler role of
#               deploy/iam/gcp-autoscaler-role.yaml); may launch VMs as raylm-worker, and as no other account.
# raylm-worker: read-write runs/, read corpora/. Nothing else: no compute, no other bucket or prefix.
# Both may list object names in the bucket (listing is granted per bucket on GCS; contents are not).
# The bucket must use uniform bucket-level access (IAM conditions need it).
set -euo pipefail
project=${1:?usage: gcp-setup.sh PROJECT [BUCKET]}
bucket=${2:-raylm-runs}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
head="raylm-head@${project}.iam.gserviceaccount.com"
worker="raylm-worker@${project}.iam.gserviceaccount.com"

gcloud iam service-accounts create raylm-head --project="$project" --display-name="raylm head"
gcloud iam service-accounts create raylm-worker --project="$project" --display-name="raylm workers"
gcloud storage buckets update "gs://${bucket}" --uniform-bucket-level-access

gcloud iam roles create raylmAutoscaler --project="$project" --file="$here/gcp-autoscaler-role.yaml"
gcloud projects add-iam-policy-binding "$project" --member="serviceAccount:${head}" \
    --role="projects/${project}/roles/raylmAutoscaler" --condition=None
gcloud iam service-accounts add-iam-policy-binding "$worker" --project="$project" \
    --member="serviceAccount:${head}" --role=roles/iam.serviceAccountUser

gcloud iam roles create raylmBucketList --project="$project" --title="raylm bucket list" \
    --permissions=storage.objects.list,storage.buckets.get
prefix() {  # member role prefix title
    gcloud storage buckets add-iam-policy-binding "gs://${bucket}" --member="serviceAccount:$1" --role="$2" \
        --condition="expression=resource.name.startsWith(\"projects/_/buckets/${bucket}/objects/$3/\"),title=$4"
}
for account in "$head" "$worker"; do
    gcloud storage buckets add-iam-policy-binding "gs://${bucket}" --member="serviceAccount:${account}" \
        --role="projects/${project}/roles/raylmBucketList"
    prefix "$account" roles/storage.objectUser runs raylm-runs-prefix
    prefix "$account" roles/storage.objectViewer corpora raylm-corpora-prefix
done
prefix "$head" roles/storage.objectUser mlflow raylm-mlflow-prefix
