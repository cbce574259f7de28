#!/usr/bin/env bash
# Peak memory of the service while it takes one large customer-list upload.
#
#   bash tests/bench/upload_memory.sh [cleanroom binary] [records ...]
#
# For each record count, starts a fresh `cleanroom demo --keep-serving` (the sample loaded), reads
# the server's peak resident set (VmHWM) once the demo is done, uploads a generated list of that
# many raw e-mail addresses as Sakura Foods over the real gRPC API (`cleanroom upload-list`, a
# separate process), and reads the peak again. The difference is what the upload cost the server
# at its worst moment. Give two binaries' figures from one run to compare builds.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${1:-${CARGO_TARGET_DIR:-target}/debug/cleanroom}
shift || true
counts=("$@")
[ ${#counts[@]} -gt 0 ] || counts=(200000 2000000)
work=$(mktemp -d)
trap 'kill "${server:-}" 2>/dev/null || true; rm -rf "$work"' EXIT

peak_kb() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }

for n in "${counts[@]}"; do
  python3 - "$n" > "$work/list.csv" <<'PY'
import sys
n = int(sys.argv[1])
out = sys.stdout
out.write("email,phone,attribute\n")
for i in range(n):
    out.write(f"bench.customer{i}@example.com,,\n")
PY
  log="$work/serve.log"
  "$bin" demo --keep-serving > "$log" 2>&1 &
  server=$!
  for _ in $(seq 1 300); do
    grep -q "until interrupted" "$log" && break
    sleep 1
  done
  addr=$(sed -n 's/^serving the loaded sample on \(.*\) until interrupted$/\1/p' "$log")
  [ -n "$addr" ] || { cat "$log"; echo "the demo service did not come up"; exit 1; }
  before=$(peak_kb "$server")
  start=$(date +%s.%N)
  "$bin" upload-list --addr "http://$addr" --token demo-sakura-token --file "$work/list.csv" > "$work/upload.log"
  end=$(date +%s.%N)
  after=$(peak_kb "$server")
  printf '%s records: server peak RSS %d MB before, %d MB after (+%d MB), upload %.1f s; %s\n' \
    "$n" $((before / 1024)) $((after / 1024)) $(((after - before) / 1024)) \
    "$(echo "$end - $start" | bc)" "$(tr '\n' ' ' < "$work/upload.log" | cut -c1-80)"
  kill "$server"
  wait "$server" 2>/dev/null || true
done
