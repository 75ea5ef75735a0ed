# A later call for detached work other than the crossover (reconstruction rows, GPU tests, train_eval.sh): wait up
# to $1 s while a pid in /tmp/others.pids lives, print the logs' tails, bring back what is written.
end=$((SECONDS + ${1:-520}))
alive() { for p in $(cat /tmp/others.pids 2>/dev/null); do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
while alive && [ $SECONDS -lt $end ]; do sleep 10; done
for f in /tmp/logs/*.log; do echo "--- $f"; grep -v LD_PRELOAD "$f" | tail -n 8; done
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
cd /tmp && tar czf "$OUT/results.tgz" rr logs train q 2>/dev/null
for f in /tmp/pack/eval-models.*; do [ -f "$f" ] && cp "$f" "$OUT/"; done  # train_eval.sh's model parts, once packed
ls -la "$OUT"
alive && exit 3 || exit 0
