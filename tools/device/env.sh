# Sourced at the start of every device command (repo root): the wheels, qdiff itself INSTALLED into
# /tmp/site (each call re-copies the working tree and drops the git-ignored qdiff/<stage> links, so
# detached processes must not import from the tree), TensorRT 8.6. Progress stays on: written to a
# file, qdiff's progress is a line per quarter, and a killed stage's log then says where it was.
for d in export calib engines runtime; do ln -sfn ../$d qdiff/$d; done
[ -d /tmp/site/diffusers ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
# reinstalled only when the code changed: replacing /tmp/site under a detached run's workers can
# break their imports mid-copy
stamp=$(find qdiff export calib engines runtime pyproject.toml -name '*.py' -o -name '*.toml' -o -name '*.json' 2>/dev/null | sort | xargs cat | md5sum | cut -c1-32)
if [ "$(cat /tmp/site/.qdiff-stamp 2>/dev/null)" != "$stamp" ]; then
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade --target /tmp/site . >/dev/null || return 1
  echo "$stamp" > /tmp/site/.qdiff-stamp
fi
rm -rf build
L=/tmp/trt86/lib
if [ -d .device/trt86-build/prebuilt-cp312 ] && [ ! -d /tmp/trt86-py ]; then cp -r .device/trt86-build/prebuilt-cp312 /tmp/trt86-py; fi
export LD_LIBRARY_PATH=$L:${LD_LIBRARY_PATH:-} QDIFF_TRT_TACTIC_SOURCES=edge_mask_convolutions,jit_convolutions PYTHONUNBUFFERED=1
# unconditional: a detached run started before the libraries arrive passes it on to the builds it starts later
# (ld.so only warns while the files are missing; filter with grep -v LD_PRELOAD)
export LD_PRELOAD=$L/libcublas.so.12:$L/libcublasLt.so.12:$L/libcudnn.so.8
export PYTHONPATH=/tmp/site:/tmp/trt86-py:$PWD
