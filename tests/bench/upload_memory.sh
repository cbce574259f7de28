#!/usr/bin/env bash
# Peak memory of the service while it takes one large customer-list upload.
#
#   bash tests/bench/upload_memory.sh [cleanroom binary] [records ...]
#
# For each record count, starts a fresh `cleanroom demo --keep-serving` (the sample loaded), reads
# the server's peak resident set (VmHWM) once the demo is done, uploads a generated list of that
# many customers as Sakura Foods over the real gRPC API (`cleanroom upload-list`, a
# separate process), and reads the peak again. The difference is what the upload cost the server
# at its worst moment. With PYTHON set to a Python that has the partner package (pip install
# ./clients/python; the CI's venv has it), it then times Sakura's first answer over the new list
# (fresh: the audience is matched against the whole list) and its repeat (served from the answer
# store), through examples/python/partner.py; the difference is the server's work for the fresh
# answer.
# Give two binaries' figures from one run to compare builds.
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
  # Sakura's sample list (so the audience is real and queries answer), then made-up customers
  # up to the count.
  python3 - "$n" sample_data/partner_lists/sakura_foods.csv > "$work/list.csv" <<'PY'
import sys
n, sample = int(sys.argv[1]), open(sys.argv[2]).read().splitlines()
out = sys.stdout
out.write(sample[0] + "\n")
rows = sample[1:n + 1]
out.write("".join(row + "\n" for row in rows))
for i in range(n - len(rows)):
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
  if [ -n "${PYTHON:-}" ]; then
    timed_query() {
      local t0 t1
      t0=$(date +%s.%N)
      CLEANROOM_TOKEN=demo-sakura-token "$PYTHON" examples/python/partner.py --addr "$addr" \
        --query matched_overlap > /dev/null
      t1=$(date +%s.%N)
      echo "$t1 - $t0" | bc
    }
    fresh=$(timed_query)
    repeat=$(timed_query)
    printf '  first answer over it %.2f s, its repeat %.2f s (peak RSS then %d MB)\n' \
      "$fresh" "$repeat" $(($(peak_kb "$server") / 1024))
  fi
  kill "$server"
  wait "$server" 2>/dev/null || true
done
