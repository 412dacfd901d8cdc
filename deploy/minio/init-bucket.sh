#!/bin/sh
# One-shot set-up of MinIO for the stack, run by the minio-init service (minio/mc image)
# after minio is healthy; safe to run again:
#   - the bucket $MINIO_BUCKET, private (no anonymous access);
#   - the policy trainyard-rw: read and write in that bucket only;
#   - the user $TRAINYARD_S3_ACCESS_KEY with that policy, used by MLflow and the workers
#     instead of the root credentials; the workers read the csv-retrain table,
#     s3://$MINIO_BUCKET/data/retrain.csv, with it too (GetObject on the bucket's objects).
set -eu

: "${MINIO_ROOT_USER:?MINIO_ROOT_USER is not set}"
: "${MINIO_ROOT_PASSWORD:?MINIO_ROOT_PASSWORD is not set}"
: "${MINIO_BUCKET:?MINIO_BUCKET is not set}"
: "${TRAINYARD_S3_ACCESS_KEY:?TRAINYARD_S3_ACCESS_KEY is not set}"
: "${TRAINYARD_S3_SECRET_KEY:?TRAINYARD_S3_SECRET_KEY is not set}"
MINIO_URL=${MINIO_URL:-http://minio:9000}
MC_CONFIG_DIR=${MC_CONFIG_DIR:-/tmp/mc}
export MC_CONFIG_DIR
mkdir -p "$MC_CONFIG_DIR"

case "$MINIO_BUCKET" in
    *[!a-z0-9.-]*)
        echo "init-bucket: MINIO_BUCKET may hold only a-z, 0-9, '.' and '-': $MINIO_BUCKET" >&2
        exit 64
        ;;
esac

mc alias set stack "$MINIO_URL" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc mb --ignore-existing "stack/$MINIO_BUCKET"
mc anonymous set none "stack/$MINIO_BUCKET"

policy_file="$MC_CONFIG_DIR/trainyard-rw.json"
printf '%s\n' \
    '{"Version": "2012-10-17", "Statement": [' \
    "  {\"Effect\": \"Allow\", \"Action\": [\"s3:GetBucketLocation\", \"s3:ListBucket\", \"s3:ListBucketMultipartUploads\"], \"Resource\": [\"arn:aws:s3:::$MINIO_BUCKET\"]}," \
    "  {\"Effect\": \"Allow\", \"Action\": [\"s3:GetObject\", \"s3:PutObject\", \"s3:DeleteObject\", \"s3:AbortMultipartUpload\", \"s3:ListMultipartUploadParts\"], \"Resource\": [\"arn:aws:s3:::$MINIO_BUCKET/*\"]}" \
    ']}' >"$policy_file"
mc admin policy create stack trainyard-rw "$policy_file"

mc admin user add stack "$TRAINYARD_S3_ACCESS_KEY" "$TRAINYARD_S3_SECRET_KEY"
case "$(mc admin user info stack "$TRAINYARD_S3_ACCESS_KEY")" in
    *trainyard-rw*) echo "init-bucket: policy trainyard-rw already attached to $TRAINYARD_S3_ACCESS_KEY" ;;
    *) mc admin policy attach stack trainyard-rw --user "$TRAINYARD_S3_ACCESS_KEY" ;;
esac
echo "init-bucket: bucket $MINIO_BUCKET ready for $TRAINYARD_S3_ACCESS_KEY"
echo "init-bucket: the csv-retrain deployment reads s3://$MINIO_BUCKET/data/retrain.csv; upload it there"
