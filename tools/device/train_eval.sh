# First call of an evaluation-models run (issue 15; carry .whl and .device/calls): the training of
# tools/train_eval_models.py started detached (it outlives the call; its pid goes to
# /tmp/others.pids), so that it can run longer than one 10-minute call. The following calls are
# `bash .device/calls/wait_pids.sh 520`, issued at once: they bring back the logs and, once the
# run has packed them, the model parts (/tmp/pack, <= 15 MB each) for tools/unpack_eval_models.py.
# "$@": train_eval_models.py's options, e.g. --parallel --compile --steps ddpm=5000,cond=4000
source .device/calls/env.sh >/dev/null 2>&1 || { echo "env.sh failed: carry .whl and .device/calls"; exit 1; }
mkdir -p /tmp/logs /tmp/train /tmp/pack
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader
setsid nohup python3 tools/train_eval_models.py --device cuda --out /tmp/train --pack /tmp/pack "$@" > /tmp/logs/train.log 2>&1 < /dev/null &
echo $! >> /tmp/others.pids
sleep 45; grep -v LD_PRELOAD /tmp/logs/train.log | tail -n 12
