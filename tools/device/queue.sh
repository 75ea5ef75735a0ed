# Run a list of GPU jobs one after another, detached, once the work already in /tmp/others.pids
# (e.g. train_eval.sh's training) has ended: the device stays busy between polls, and nothing
# waits for a call to come back to start the next job. Usage (a call, carrying .device/calls):
#   bash .device/calls/queue.sh tools/device/queue-eval-models.txt
# FILE: one job per line, "NAME: COMMAND" ('#' lines and blank lines skipped); each COMMAND runs
# with $Q = /tmp/q/NAME (its output folder; wait_pids.sh tars /tmp/q into results.tgz, so a job's
# reports come back however many files they are) and logs to /tmp/logs/q-NAME.log. A job that
# fails is logged and the next one starts. Waits at most QUEUE_WAIT_S (default 1800) for the
# earlier pids.
source .device/calls/env.sh >/dev/null 2>&1 || { echo "env.sh failed: carry .whl and .device/calls"; exit 1; }
[ -f "$1" ] || { echo "queue.sh: no job list at '$1'"; exit 1; }
mkdir -p /tmp/logs /tmp/q
cp "$1" /tmp/q/jobs.txt  # the next call's copy of the tree must not change the list under the runner
earlier=$(cat /tmp/others.pids 2>/dev/null | tr '\n' ' ')
setsid nohup bash -c '
  end=$((SECONDS + ${QUEUE_WAIT_S:-1800}))
  for p in '"$earlier"'; do while kill -0 "$p" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 5; done; done
  grep -v "^\s*#" /tmp/q/jobs.txt | grep ":" | while IFS= read -r line; do
    name=${line%%:*}; cmd=${line#*:}
    export Q=/tmp/q/$name; mkdir -p "$Q"
    echo "$(date +%T) start $name" >> /tmp/logs/queue.log
    t0=$SECONDS; bash -c "$cmd" > /tmp/logs/q-$name.log 2>&1 < /dev/null; rc=$?
    echo "$(date +%T) end $name rc=$rc $((SECONDS - t0)) s" >> /tmp/logs/queue.log
  done
  echo "$(date +%T) queue done" >> /tmp/logs/queue.log
' > /dev/null 2>&1 < /dev/null &
echo $! >> /tmp/others.pids
echo "queue.sh: $(grep -v '^\s*#' "$1" | grep -c ':') jobs, after pids: ${earlier:-none}"
