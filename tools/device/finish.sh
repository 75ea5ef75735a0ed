# The call after the last 30 MB part: join TensorRT, check it, open the build gate, start the GPU tests.
mkdir -p /tmp/logs
bash /tmp/trt86/tools/unpack.sh gather "$1" >/dev/null || exit 1
bash /tmp/trt86/tools/unpack.sh finish > /tmp/logs/finish.log 2>&1 || { tail /tmp/logs/finish.log; exit 1; }
source .device/calls/env.sh || exit 1
python3 -c "import tensorrt as trt; b = trt.Builder(trt.Logger()); print('tensorrt', trt.__version__, 'fast int8', b.platform_has_fast_int8)" && touch /tmp/trt86/READY
[ "${2:-}" = tests ] || exit 0  # `finish.sh PART tests`: also start the GPU tests, detached
setsid nohup python3 -m pytest -m "tensorrt or gpu" -v -rfE -p no:cacheprovider tests/ > /tmp/logs/pytest.log 2>&1 < /dev/null &
echo $! >> /tmp/others.pids  # timing waits for it
