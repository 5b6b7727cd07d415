#!/usr/bin/env bash
# Issue 17's table against a real llama-cpp-python server (one slot): the plain
# synchronous openai loop, asyncio.gather over the async client, enrich from a
# baseline tree and enrich from this checkout, interleaved, ROUNDS times.
#
# "added" is each process's wall minus the server's own time for its requests
# (the sum of the server's `total time` log lines), the steady part: the same
# answers cost a shared machine's server 18-28 s from one run to the next.
#
# Start the server with its log in $LOG, e.g. (one slot, niced, 2 threads):
#   nice -n 10 python -m llama_cpp.server --model gemma-3-270m-q4_k_m.gguf \
#     --host 127.0.0.1 --port 8077 --n_ctx 4096 --n_threads 2 \
#     --model_alias gemma-3-270m --chat_format gemma > server.log 2>&1 &
# then: LOG=server.log BASE=/tmp/enrich-before bash benchmarks/llama_cpp_table.sh
set -euo pipefail
URL=${URL:-http://127.0.0.1:8077/v1}
MODEL=${MODEL:-gemma-3-270m}
MAXTOK=${MAXTOK:-48}
ROUNDS=${ROUNDS:-3}
ROWS=${ROWS:-15}
LOG=${LOG:?set LOG to the log file of the llama-cpp-python server}
BASE=${BASE:?a baseline checkout of pipeline/ (git archive REV pipeline | tar -x -C DIR)}
TREE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-python}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
head -n $((ROWS + 1)) "$TREE/pipeline/sample/questions.csv" > "$W/in.csv"
cat > "$W/plain.py" <<'PY'
import csv, sys, openai
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r["question"]]
client = openai.OpenAI(base_url=sys.argv[2], api_key="x", max_retries=0, timeout=600)
ok = sum(
    client.chat.completions.create(
        model=sys.argv[3], messages=[{"role": "user", "content": r["question"]}],
        max_tokens=int(sys.argv[4]),
    ).choices[0].message.content is not None
    for r in rows
)
print(f"ok {ok}/{len(rows)}")
PY
cat > "$W/gather.py" <<'PY'
import asyncio, csv, sys, openai
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r["question"]]
async def main():
    client = openai.AsyncOpenAI(base_url=sys.argv[2], api_key="x")
    async def one(q):
        a = await client.chat.completions.create(
            model=sys.argv[3], messages=[{"role": "user", "content": q}], max_tokens=int(sys.argv[4]))
        return a.choices[0].message.content is not None
    ok = sum(await asyncio.gather(*(one(r["question"]) for r in rows), return_exceptions=False))
    print(f"ok {ok}/{len(rows)}")
asyncio.run(main())
PY
answered() { grep -c 'POST /v1/chat/completions' "$LOG" || true; }
server_s() { { grep 'total time' "$LOG" || true; } | awk '{s += $5} END {printf "%.2f", s / 1000}'; }
measure() { # label, command...
  local label=$1; shift
  local b t0 s e a t1
  b=$(answered); t0=$(server_s); s=$(date +%s.%N)
  "$@" > "$W/last.txt" 2>&1
  e=$(date +%s.%N); a=$(answered); t1=$(server_s)
  printf '  %-14s wall %6.2f s  server answered %3d  server time %6.2f s  added %5.2f s  | %s\n' \
    "$label" "$(echo "$e - $s" | bc)" $((a - b)) "$(echo "$t1 - $t0" | bc)" \
    "$(echo "($e - $s) - ($t1 - $t0)" | bc)" "$(tail -1 "$W/last.txt" | cut -c1-80)"
}
enrich_run() { # tree, output
  # From $W: `python -m` puts the working directory first on the path, and
  # from a checkout it would run that checkout's code whatever PYTHONPATH says.
  (cd "$W" && PYTHONPATH=$1 ENRICH_CACHE_DIR="$W/cache-$RANDOM" OPENAI_API_KEY=x "$PY" -m pipeline run \
    --input "$W/in.csv" --column question --output "$2" --model "$MODEL" --base-url "$URL" \
    --max-tokens "$MAXTOK" --quiet)
}
report() { # output
  "$PY" - "$1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1] + ".report.json"))
c, q, s, t = r["counts"], r["requests"], r["server"], r["timing"]
print(f"    ok {c['ok']}/{c['rows']} sent {q['sent']} retries {q['retries']} stalled {q['stalled']} "
      f"settled {s['concurrency']} abandoned {s['abandoned']} p50 {t['latency_ms'].get('p50', 0) / 1000:.1f} s "
      f"| {s['concurrency_reason'][:80]}")
PY
}
for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)"
  measure plain "$PY" "$W/plain.py" "$W/in.csv" "$URL" "$MODEL" "$MAXTOK"
  measure gather "$PY" "$W/gather.py" "$W/in.csv" "$URL" "$MODEL" "$MAXTOK"
  out="$W/before-$round.parquet"; measure enrich-before enrich_run "$BASE" "$out"; report "$out"
  out="$W/after-$round.parquet"; measure enrich-after enrich_run "$TREE" "$out"; report "$out"
done
