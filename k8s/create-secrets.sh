#!/usr/bin/env bash
# k8s/create-secrets.sh local|prod [NAMESPACE]
# Creates the two Secrets the manifests reference by name and git never holds:
#   amalgam-ray-token  key auth_token: the Ray cluster's token (random; kept if it exists)
#   amalgam-s3         keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY:
#                        local: random, and MinIO (overlays/local) is started with them;
#                        prod:  taken from this shell's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
# Values go through 0600 temp files, never on a command line, and are never printed.
set -euo pipefail
mode=${1:?usage: k8s/create-secrets.sh local|prod [namespace]}
ns=${2:-amalgam}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT; umask 077
rand() { python3 -c 'import secrets, sys; print(secrets.token_hex(int(sys.argv[1])), end="")' "$1"; }
have() { kubectl -n "$ns" get secret "$1" >/dev/null 2>&1; }
make() { kubectl -n "$ns" create secret generic "$@" --dry-run=client -o yaml | kubectl apply -f - >/dev/null; }

kubectl get namespace "$ns" >/dev/null 2>&1 || kubectl create namespace "$ns" >/dev/null
if ! have amalgam-ray-token; then
  rand 32 > "$tmp/auth_token"
  make amalgam-ray-token --from-file=auth_token="$tmp/auth_token"
  echo "created secret $ns/amalgam-ray-token"
fi
case $mode in
  local)
    if ! have amalgam-s3; then
      printf 'amalgam-%s' "$(rand 4)" > "$tmp/AWS_ACCESS_KEY_ID"
      rand 20 > "$tmp/AWS_SECRET_ACCESS_KEY"
      make amalgam-s3 --from-file="$tmp/AWS_ACCESS_KEY_ID" --from-file="$tmp/AWS_SECRET_ACCESS_KEY"
      echo "created secret $ns/amalgam-s3 (random keys for the in-cluster MinIO)"
    fi ;;
  prod)
    : "${AWS_ACCESS_KEY_ID:?set AWS_ACCESS_KEY_ID (or use workload identity and drop the env refs)}"
    : "${AWS_SECRET_ACCESS_KEY:?set AWS_SECRET_ACCESS_KEY}"
    printf '%s' "$AWS_ACCESS_KEY_ID" > "$tmp/AWS_ACCESS_KEY_ID"
    printf '%s' "$AWS_SECRET_ACCESS_KEY" > "$tmp/AWS_SECRET_ACCESS_KEY"
    make amalgam-s3 --from-file="$tmp/AWS_ACCESS_KEY_ID" --from-file="$tmp/AWS_SECRET_ACCESS_KEY"
    echo "created or updated secret $ns/amalgam-s3" ;;
  *) echo "usage: k8s/create-secrets.sh local|prod [namespace]" >&2; exit 2 ;;
esac
