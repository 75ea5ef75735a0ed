# Every later call: wait on the crossover, then bring back what is written so far.
source .device/calls/env.sh >/dev/null 2>&1
python3 benchmarks/sd15_crossover.py --out /tmp/xo --wait "${1:-520}"; rc=$?
echo "--- recon"; tail -n 6 /tmp/logs/recon.log; echo "--- pytest"; grep -E "PASSED|FAILED|ERROR|passed|failed" /tmp/logs/pytest.log | tail -n 30
free -g | head -2; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
cd /tmp && find sd15 -maxdepth 2 \( -name '*.json' -o -name '*.md' -o -name '*.log' \) -size -4M > /tmp/sd15-small.txt 2>/dev/null
tar czf $OUT/results.tgz xo rr logs $(cat /tmp/sd15-small.txt) 2>/dev/null; ls -la $OUT
for f in /tmp/xo-cache/timing-*.cache; do [ -f "$f" ] && [ "$(stat -c%s "$f")" -lt 16000000 ] && cp "$f" "$OUT/"; done; exit $rc
