# Run a list of GPU jobs one after another, detached, once the work already in /tmp/others.pids
# (e.g. train_eval.sh's training) has ended: the device stays busy between polls, and nothing
# waits for a call to come back to start the next job. Usage (a call, carrying .device/calls):
#   bash .device/calls/queue.sh tools/device/queue-eval-models.txt
# FILE: one job per line, "NAME: COMMAND" (NAME in letters, digits, '.', '_', '-'; '#' lines and
# blank lines skipped); each COMMAND runs with $Q = /tmp/q/NAME (its output folder; wait_pids.sh
# tars /tmp/q into results.tgz, so a job's reports come back however many files they are) and logs
# to /tmp/logs/q-NAME.log. A job that fails is logged and the next one starts. A line
# "require: COMMAND" is a gate: it runs after the wait, and no job starts unless it exits 0 (e.g.
# the training's metrics.json says done). If the earlier pids outlive QUEUE_WAIT_S (default 1800),
# the queue gives up rather than share the GPU with them.
source .device/calls/env.sh >/dev/null 2>&1 || { echo "env.sh failed: carry .whl and .device/calls"; exit 1; }
[ -f "$1" ] || { echo "queue.sh: no job list at '$1'"; exit 1; }
bad=$(grep -v '^\s*#' "$1" | grep ':' | cut -d: -f1 | grep -v '^require$' | grep -v -E '^[A-Za-z0-9._-]+$')
[ -z "$bad" ] || { echo "queue.sh: job names must be letters, digits, '.', '_', '-': $bad"; exit 1; }
[ -e /tmp/q/jobs.txt ] && { echo "queue.sh: a queue is already set up (/tmp/q/jobs.txt); one per machine"; exit 1; }
mkdir -p /tmp/logs /tmp/q
cp "$1" /tmp/q/jobs.txt  # the next call's copy of the tree must not change the list under the runner
earlier=$(cat /tmp/others.pids 2>/dev/null | tr '\n' ' ')
setsid nohup bash -c '
  log() { echo "$(date +%T) $*" >> /tmp/logs/queue.log; }
  end=$((SECONDS + ${QUEUE_WAIT_S:-1800}))
  for p in '"$earlier"'; do
    while kill -0 "$p" 2>/dev/null; do
      [ $SECONDS -lt $end ] || { log "gave up: pid $p still runs after ${QUEUE_WAIT_S:-1800} s"; exit 1; }
      sleep 5
    done
  done
  gate=$(grep "^require:" /tmp/q/jobs.txt | head -n 1 | cut -d: -f2-)
  if [ -n "$gate" ] && ! bash -c "$gate" >> /tmp/logs/queue.log 2>&1; then log "gate failed, no job started: $gate"; exit 1; fi
  grep -v "^\s*#" /tmp/q/jobs.txt | grep ":" | grep -v "^require:" | while IFS= read -r line; do
    name=${line%%:*}; cmd=${line#*:}
    export Q="/tmp/q/$name"; mkdir -p "$Q"
    log "start $name"
    t0=$SECONDS; bash -c "$cmd" > "/tmp/logs/q-$name.log" 2>&1 < /dev/null; rc=$?
    log "end $name rc=$rc $((SECONDS - t0)) s"
  done
  log "queue done"
' > /dev/null 2>&1 < /dev/null &
echo $! >> /tmp/others.pids
echo "queue.sh: $(grep -v '^\s*#' "$1" | grep ':' | grep -vc '^require:') jobs, after pids: ${earlier:-none}"
