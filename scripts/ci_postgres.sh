#!/usr/bin/env bash
# Start Debian's PostgreSQL and make a role + database for the collect tests; prints the URL the
# tests read from PREFTUNE_TEST_POSTGRES_URL:   export PREFTUNE_TEST_POSTGRES_URL=$(bash scripts/ci_postgres.sh)
set -euo pipefail
if ! command -v pg_lsclusters >/dev/null; then
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
fi
version=$(pg_lsclusters -h | awk 'NR==1{print $1}')
pg_ctlcluster "$version" main start >&2 2>/dev/null || true
for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 && break; sleep 1; done
su postgres -c "psql -qtAc \"SELECT 1 FROM pg_roles WHERE rolname='preftune'\"" | grep -q 1 \
  || su postgres -c "psql -qc \"CREATE ROLE preftune LOGIN PASSWORD 'preftune'\"" >&2
su postgres -c "psql -qtAc \"SELECT 1 FROM pg_database WHERE datname='preftune_test'\"" | grep -q 1 \
  || su postgres -c "createdb -O preftune preftune_test" >&2
echo "postgresql://preftune:preftune@127.0.0.1:5432/preftune_test"
