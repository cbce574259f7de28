#!/usr/bin/env bash
# A deployment as a retailer would run it, checked by the clients a partner or a reviewer uses.
# .ci/run runs this inside a network namespace of its own (`unshare -rn`), so the service listens
# on a non-loopback address (10.200.0.1, one end of a veth pair) that nothing outside can reach:
#   - `cleanroom throwaway-pki` makes a CA and a server certificate for that address;
#   - `cleanroom serve` runs with [tls] on it, the sample rules (their published demo tokens are
#     accepted only with --allow-demo-tokens) and a copy of the allow-list it follows;
#   - the analyst loads the sample with `cleanroom ingest`, the partners upload their lists with
#     `cleanroom upload-list`, the legal reviewer approves the allow-list through the review
#     page's API, all over TLS trusting the CA;
#   - then the stub-less grpcio client (reflection), the partner package's integration tests
#     (clients/python: pytest, answers in Polars, uploads), the partner example built on it and
#     the review page in headless Chromium run against it.
#
#   bash tests/deploy/serve_in_netns.sh <cleanroom binary> <python with the CI packages> <artifacts dir>
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=$1
python=$2
artifacts=$3
host=10.200.0.1

ip link set lo up
ip link add v0 type veth peer name v1
ip addr add "$host/24" dev v0
ip link set v0 up
ip link set v1 up

work=$(mktemp -d)
# The service is stopped and waited for before its directory goes: it still writes while it
# shuts down, and a directory removed under it would fail the run.
trap 'if [ -n "${server:-}" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi; rm -rf "$work"' EXIT
cp -r queries "$work/queries"
# The sample contracts and partners' declarations end on fixed dates; this deployment runs on
# the real clock. The declarations' signed documents sit beside the rules that name them.
sed -E 's/^(expires|valid_until) = ".*"/\1 = "2099-12-31"/' sample_data/rules.toml > "$work/rules.toml"
cp -r sample_data/declarations "$work/declarations"
"$bin" throwaway-pki --dir "$work/tls" --name "$host" --client sakura_foods --client kumo_denki
cat > "$work/serve.toml" <<TOML
listen = "$host:50443"
review_listen = "$host:50444"
reload_seconds = 1
data_dir = "$work/data"
rules = "$work/rules.toml"
queries = "$work/queries"
[tls]
cert_file = "$work/tls/server.pem"
key_file = "$work/tls/server.key"
TOML
export CLEANROOM_MASTER_SECRET
CLEANROOM_MASTER_SECRET=$("$python" -c 'import secrets; print(secrets.token_hex(32))')
log="$artifacts/serve.log"
"$bin" serve --config "$work/serve.toml" --allow-demo-tokens 2> "$log" &
server=$!
for _ in $(seq 1 300); do
  grep -q "serving gRPC on https://$host:50443" "$log" && break
  kill -0 "$server" 2>/dev/null || { cat "$log"; echo "cleanroom serve exited"; exit 1; }
  sleep 0.2
done
grpc="https://$host:50443"
page="https://$host:50444"
export CLEANROOM_CA="$work/tls/ca.pem"

echo "== load the sample over TLS (cleanroom ingest, cleanroom upload-list)"
for kind in members purchases consent; do
  file=sample_data/$kind.csv
  [ "$kind" = consent ] && file=sample_data/consent_events.csv
  CLEANROOM_TOKEN=demo-analyst-token "$bin" ingest --kind "$kind" --file "$file" --addr "$grpc"
done
for partner in sakura_foods:demo-sakura-token kumo_denki:demo-kumo-token; do
  CLEANROOM_TOKEN=${partner#*:} "$bin" upload-list \
    --file "sample_data/partner_lists/${partner%%:*}.csv" --addr "$grpc"
done

echo "== the legal reviewer approves the allow-list (review page API over HTTPS)"
"$python" - "$page" "$CLEANROOM_CA" <<'PY'
import json, ssl, sys, urllib.request

page, ca = sys.argv[1], sys.argv[2]
context = ssl.create_default_context(cafile=ca)

def call(path, body=None):
    request = urllib.request.Request(page + path, method="POST" if body else "GET",
                                     data=json.dumps(body).encode() if body else None)
    request.add_header("Authorization", "Bearer demo-legal-token")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, context=context) as response:
        return json.load(response)

for query in call("/api/allowlist")["queries"]:
    if query["state"] != "approved":
        call(f"/api/queries/{query['id']}/approve",
             {"content_sha256": query["content_sha256"], "note": "CI deployment review"})
        print("approved", query["id"])
PY

echo "== stub-less gRPC client (reflection over TLS)"
"$python" tests/python/stubless_client.py "$host:50443" "$CLEANROOM_CA"

# The package's integration tests take the service from the environment and are skipped without
# it: here they must run, so a skipped test fails the step.
echo "== Python partner package (clients/python): integration tests against this deployment"
CLEANROOM_TEST_ADDR="$grpc" CLEANROOM_TEST_CA="$CLEANROOM_CA" PYTHONDONTWRITEBYTECODE=1 \
  "$python" -m pytest -p no:cacheprovider -v -rs clients/python/tests/test_integration.py \
  | tee "$artifacts/pytest-integration.log"
if grep -Eq '[0-9]+ skipped' "$artifacts/pytest-integration.log"; then
  echo "the partner package's integration tests were skipped"
  exit 1
fi

echo "== Python partner example on the package (examples/python/partner.py)"
CLEANROOM_TOKEN=demo-sakura-token "$python" examples/python/partner.py --addr "$grpc" \
  --query category_buyers_by_age_band --param start=2025-11-01 --param end=2026-11-01

echo "== review page in headless Chromium (HTTPS)"
SE_OFFLINE=true "$python" tests/python/review_page_test.py \
  --url "$page/" --queries-dir "$work/queries" --grpc "$host:50443" \
  --ca "$CLEANROOM_CA" --spki "$(cat "$work/tls/server.spki")" \
  --screenshot "$artifacts/review-page.png"
echo "screenshots: $artifacts/review-page.png $artifacts/review-page-after-approve.png"
