"""Write an ONNX graph without its large weights: every node, name and shape, small constants kept.

`qdiff inspect` needs only the graph's structure and tensor shapes to attribute engine layers
and count MACs, so a multi-GB graph shrinks to a few MB that can live in tests/data or travel
with an engine report. Initializers above `--keep-bytes` keep their dims and dtype but lose
their data; small ones (Reshape targets, scales) stay, so shape inference still works.

    python tools/onnx_skeleton.py big.onnx skeleton.onnx [--keep-bytes 4096]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnx
from onnx.external_data_helper import uses_external_data


def skeleton(src: Path, dst: Path, keep_bytes: int = 4096) -> tuple[int, int]:
    model = onnx.load(str(src), load_external_data=False)
    stripped = kept = 0
    for init in model.graph.initializer:
        if uses_external_data(init) or len(init.raw_data) > keep_bytes:
            init.ClearField("raw_data")
            del init.external_data[:]
            init.data_location = onnx.TensorProto.DEFAULT
            stripped += 1
        else:
            kept += 1
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(dst)
    return stripped, kept


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--keep-bytes", type=int, default=4096)
    args = p.parse_args(argv)
    stripped, kept = skeleton(args.src, args.dst, args.keep_bytes)
    print(f"{args.dst}: {stripped} initializers stripped, {kept} kept, {args.dst.stat().st_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
