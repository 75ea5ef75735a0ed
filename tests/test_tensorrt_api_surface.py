"""The TensorRT API surface qdiff uses, checked against the real TensorRT 10.x and 11.x bindings.

No TensorRT >= 10 runs on any machine of this project (the GPU machine has 8.6 only), yet
`pip install tensorrt` gives users 11.x. So this test downloads the real Python binding wheels
from the registry (cached in ~/.cache/qdiff-trt-wheels, never in the repository), builds stub
libnvinfer / libnvinfer_plugin / libnvonnxparser shared libraries of the sonames the bindings
link (each exporting the few C symbols the bindings import, as functions that are never called),
imports the bindings in a subprocess with LD_LIBRARY_PATH at the stubs, and checks:

1. every `trt.X.Y...` name that engines/ and runtime/ use (found with `ast`) resolves, except the
   names `engines.compat.VERSION_GUARDED` declares outside that version's range;
2. every member in `compat.OBJECT_MEMBERS` exists on its class;
3. the guard table tells the truth: a guarded name exists inside its declared range (unless it is
   probed by availability), so a guard cannot hide a name the code needs;
4. compat's version dispatch on the real modules: strong typing on 10/11, network flags, and a
   tactic-source mask built only from sources the version has.

It skips (with the reason) only without a C compiler/`nm`, without a Python matching the wheels,
or when the wheels cannot be downloaded and are not cached.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "engines").glob("*.py")) + sorted((ROOT / "runtime").glob("*.py"))
CACHE = Path(os.environ.get("QDIFF_TRT_WHEEL_CACHE", Path.home() / ".cache" / "qdiff-trt-wheels"))
WHEELS = {  # TensorRT major -> (binding package, version)
    10: ("tensorrt-cu12-bindings", "10.16.1.11"),
    11: ("tensorrt-cu13-bindings", "11.4.0.106"),
}
PY_TAG = "3.11"  # the cp311 wheels; both versions publish one


# ----------------------------------------------------------------------------- names used by the code


def used_trt_names(paths: list[Path] = SOURCES) -> dict[str, list[str]]:
    """'BuilderFlag.FP16' -> ['engines/builder.py:123', ...]: every attribute chain rooted at a
    name `trt` (the TensorRT module, by qdiff's convention), longest chain per expression."""
    found: dict[str, list[str]] = {}
    for path in paths:
        tree = ast.parse(path.read_text(), filename=str(path))
        inner: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
                inner.add(id(node.value))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or id(node) in inner:
                continue
            parts = []
            cur: ast.AST = node
            while isinstance(cur, ast.Attribute):
                parts.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id == "trt":
                name = ".".join(reversed(parts))
                found.setdefault(name, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_the_ast_scan_sees_the_names_the_issue_named():
    """The scan is the test's eyes: it must see the names that broke on 11.x."""
    names = used_trt_names()
    for name in ("BuilderFlag.FP16", "BuilderFlag.INT8", "BuilderFlag.PREFER_PRECISION_CONSTRAINTS", "NetworkDefinitionCreationFlag.STRONGLY_TYPED", "ILogger.Severity.ERROR", "OnnxParser"):
        assert name in names, name
    assert all(":" in w for where in names.values() for w in where)  # file:line, for the failure message


# ----------------------------------------------------------------------------- the real bindings


def _tool(name: str) -> str | None:
    return shutil.which(name)


def _python_for_wheels() -> str | None:
    """A CPython 3.11 to import the cp311 wheels: this one, or one on PATH / under pyenv."""
    if sys.version_info[:2] == (3, 11):
        return sys.executable
    for cand in [shutil.which("python3.11"), *sorted(Path("/root/.pyenv/versions").glob("3.11*/bin/python3.11"))]:
        if cand and Path(cand).exists():
            return str(cand)
    return None


def _wheel(major: int) -> Path:
    package, version = WHEELS[major]
    CACHE.mkdir(parents=True, exist_ok=True)
    stem = package.replace("-", "_") + f"-{version}-"
    found = sorted(CACHE.glob(stem + "cp311-*.whl"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", PY_TAG, f"{package}=={version}", "-d", str(CACHE)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    found = sorted(CACHE.glob(stem + "cp311-*.whl"))
    if not found:
        pytest.skip(f"cannot download {package}=={version} for cp311 (no network?): {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return found[0]


def _unpacked(major: int) -> Path:
    import zipfile

    wheel = _wheel(major)
    target = CACHE / "unpacked" / wheel.stem
    if not (target / "tensorrt_bindings" / "__init__.py").exists():
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target


def _needed_and_imports(so: Path) -> tuple[list[str], list[str]]:
    """The sonames `so` links (NEEDED) and the unversioned, undefined C symbols it imports that
    this process does not already provide (libc, libdl, Python's C API): TensorRT's entry points."""
    import ctypes

    dyn = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[", 1)[1].split("]", 1)[0] for line in dyn.splitlines() if "(NEEDED)" in line]
    und = subprocess.run(["nm", "-D", "--undefined-only", str(so)], capture_output=True, text=True, check=True).stdout
    here = ctypes.CDLL(None)
    symbols = []
    for line in und.splitlines():
        fields = line.split()
        if len(fields) != 2 or fields[0] != "U" or "@" in fields[1]:
            continue  # weak ('w') or versioned (glibc, libstdc++) symbols resolve elsewhere
        name = fields[1]
        if name.startswith(("Py", "_Py")) or hasattr(here, name):
            continue
        symbols.append(name)
    return needed, sorted(symbols)


def _stubs(major: int, package: Path) -> Path:
    """Stub libnvinfer/libnvinfer_plugin/libnvonnxparser.so.<major> exporting the TensorRT symbols
    the bindings import; each is `void *name(void) { return 0; }` and is never called by an import
    and attribute lookups (the test never creates a TensorRT object)."""
    so = package / "tensorrt_bindings" / "tensorrt.so"
    needed, symbols = _needed_and_imports(so)
    libs = {n: [] for n in needed if n.startswith(("libnvinfer", "libnvonnxparser"))}
    assert {f"libnvinfer.so.{major}", f"libnvonnxparser.so.{major}"} <= set(libs), needed
    for sym in symbols:  # parser entry points in the parser stub, the rest in libnvinfer's
        lib = f"libnvonnxparser.so.{major}" if "OnnxParser" in sym else f"libnvinfer_plugin.so.{major}" if sym == "initLibNvInferPlugins" and f"libnvinfer_plugin.so.{major}" in libs else f"libnvinfer.so.{major}"
        libs[lib].append(sym)
    key = json.dumps(libs, sort_keys=True)
    out = CACHE / "stubs" / f"trt{major}"
    if (out / "key.json").exists() and (out / "key.json").read_text() == key and all((out / n).exists() for n in libs):
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for lib, syms in libs.items():
        src = out / f"{lib}.c"
        src.write_text("".join(f"void *{s}(void) {{ return 0; }}\n" for s in syms) or "int qdiff_trt_stub;\n")
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(out / lib), f"-Wl,-soname,{lib}", str(src)], check=True, capture_output=True)
    (out / "key.json").write_text(key)
    return out


_PROBE = textwrap.dedent(
    """
    import json, sys
    import tensorrt_bindings as trt
    sys.modules["tensorrt"] = trt  # what `import tensorrt` gives with the full wheel
    names, members = json.loads(sys.argv[1]), json.loads(sys.argv[2])

    def resolves(dotted):
        obj = trt
        for part in dotted.split("."):
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
        return True

    out = {"version": trt.__version__, "names": {n: resolves(n) for n in names},
           "members": {f"{c}.{m}": resolves(f"{c}.{m}") for c, ms in members.items() for m in ms}}
    if sys.argv[3] == "1":  # compat's dispatch on the real module
        from qdiff.engines import compat
        feats = compat.features(trt)
        mask, dropped = compat.tactic_source_mask(trt, compat.TACTIC_SOURCE_NAMES)
        expect = 0
        for n in compat.available_tactic_sources(trt):
            expect |= 1 << int(getattr(trt.TacticSource, n.upper()))
        out["dispatch"] = {
            "typing": feats.typing, "weak_typing": feats.weak_typing, "int4": feats.int4, "progress_monitor": feats.progress_monitor,
            "flags": compat.network_flags(trt, feats.typing), "strongly_typed_bit": 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED),
            "available_tactics": list(compat.available_tactic_sources(trt)), "mask": mask, "expected_mask": expect, "dropped": list(dropped),
            "torch_free_dtypes": sorted(n for n in ("BF16", "INT64", "INT4", "FP8") if hasattr(trt.DataType, n)),
        }
    print("QDIFF-PROBE " + json.dumps(out))
    """
)


def _probe(major: int) -> dict:
    for tool in ("gcc", "nm", "readelf"):
        if _tool(tool) is None:
            pytest.skip(f"no {tool} on this machine: the stub TensorRT libraries cannot be built")
    python = _python_for_wheels()
    if python is None:
        pytest.skip("no CPython 3.11 here to import the cp311 TensorRT binding wheels")
    package = _unpacked(major)
    stubs = _stubs(major, package)
    from qdiff.engines.compat import OBJECT_MEMBERS, VERSION_GUARDED

    names = sorted(set(used_trt_names()) | set(VERSION_GUARDED))
    dispatch = "1" if python == sys.executable else "0"  # qdiff is importable from this Python
    env = {**os.environ, "LD_LIBRARY_PATH": f"{stubs}:{os.environ.get('LD_LIBRARY_PATH', '')}", "PYTHONPATH": os.pathsep.join([str(package), str(ROOT)])}
    proc = subprocess.run([python, "-c", _PROBE, json.dumps(names), json.dumps(OBJECT_MEMBERS), dispatch], capture_output=True, text=True, env=env, timeout=120)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("QDIFF-PROBE ")), None)
    assert line is not None, f"importing the TensorRT {major} bindings against the stubs failed:\n{proc.stderr[-3000:]}"
    return json.loads(line.removeprefix("QDIFF-PROBE "))


@pytest.fixture(scope="module", params=sorted(WHEELS), ids=lambda m: f"trt{m}")
def surface(request) -> tuple[int, dict]:
    return request.param, _probe(request.param)


def _in_range(major: int, rng: tuple[int, int | None, str]) -> bool:
    lo, hi, _ = rng
    return major >= lo and (hi is None or major < hi)


def test_every_trt_name_the_code_uses_resolves_or_is_guarded(surface):
    major, probe = surface
    from qdiff.engines.compat import VERSION_GUARDED

    assert probe["version"] == WHEELS[major][1]
    used = used_trt_names()
    missing = {}
    for name, where in used.items():
        guard = VERSION_GUARDED.get(name)
        if guard is not None and not _in_range(major, guard):
            continue  # the code does not use it on this version
        if not probe["names"][name] and not (guard is not None and name in _by_availability()):
            missing[name] = where
    assert not missing, f"TensorRT {probe['version']} lacks names engines/ and runtime/ use without a version guard (add the guard and an entry in engines.compat.VERSION_GUARDED): {missing}"


def test_object_members_the_code_calls_exist(surface):
    major, probe = surface
    missing = [m for m, ok in probe["members"].items() if not ok]
    assert not missing, f"TensorRT {probe['version']} lacks members in engines.compat.OBJECT_MEMBERS: {missing}"


def _by_availability() -> frozenset[str]:
    from qdiff.engines.compat import BY_AVAILABILITY

    return BY_AVAILABILITY


def test_the_version_guards_tell_the_truth(surface):
    """Inside its range a guarded name must exist (unless probed by availability); the names the
    issue found removed in 11.x are indeed gone there and guarded to end before 11."""
    major, probe = surface
    from qdiff.engines.compat import VERSION_GUARDED

    wrong = [n for n, g in VERSION_GUARDED.items() if _in_range(major, g) and not probe["names"][n] and n not in _by_availability()]
    assert not wrong, f"guarded names missing inside their declared range on TensorRT {probe['version']}: {wrong}"
    removed_in_11 = ["BuilderFlag.FP16", "BuilderFlag.INT8", "BuilderFlag.PREFER_PRECISION_CONSTRAINTS", "ILayer.precision", "ILayer.set_output_type", "ICudaEngine.device_memory_size", "NetworkDefinitionCreationFlag.EXPLICIT_BATCH"]
    if major == 11:
        assert not any(probe["names"][n] for n in removed_in_11), {n: probe["names"][n] for n in removed_in_11}
        assert not any(probe["names"][f"TacticSource.{s}"] for s in ("CUBLAS", "CUBLAS_LT", "CUDNN"))
    else:
        assert all(probe["names"][n] for n in removed_in_11)  # deprecated, still there in 10.x
    for n in removed_in_11:
        assert not _in_range(11, VERSION_GUARDED[n])


def test_compat_dispatch_on_the_real_bindings(surface):
    """Pure CPU: compat on the real 10.x/11.x module picks the strongly typed path, sets only the
    STRONGLY_TYPED network flag, and builds the tactic mask from sources the version has."""
    major, probe = surface
    d = probe.get("dispatch")
    if d is None:
        pytest.skip("the bindings were imported by another Python than qdiff's; dispatch not run")
    assert d["typing"] == "strong" and d["flags"] == d["strongly_typed_bit"]
    assert d["weak_typing"] is (major == 10) and d["progress_monitor"]
    assert d["mask"] == d["expected_mask"] and d["mask"] != 0
    if major == 11:
        assert d["available_tactics"] == ["edge_mask_convolutions", "jit_convolutions"]
        assert d["dropped"] == ["cublas", "cublas_lt", "cudnn"]
    else:
        assert d["dropped"] == [] and len(d["available_tactics"]) == 5
    assert {"BF16", "INT64", "INT4", "FP8"} <= set(d["torch_free_dtypes"])
