"""The on-disk object cache of runtime.jit, seen from fresh processes: reused across
processes, damaged entries rebuilt (never executed), unsafe directories ignored (and warned
about), concurrent writers safe. Each process compiles a tiny kernel ``x + C`` (one C per cache entry) and
reports whether it came from the cache and what it computed."""
import ctypes
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fqt_compiler.codegen.targets import host_target
from fqt_compiler.runtime import jit

ROOT = Path(__file__).resolve().parents[1]
IR = """define i64 @fqt_cache_probe(i64 %x) {
  %y = add i64 %x, {const}
  ret i64 %y
}
"""
# The processes import jit.py without the package __init__ files (which pull in torch and
# the whole compiler): a cold start of a few hundred milliseconds instead of seconds.
SCRIPT = """
import ctypes, json, os, sys, types
for name in ("fqt_compiler", "fqt_compiler.runtime", "fqt_compiler.codegen"):
    pkg = types.ModuleType(name)
    pkg.__path__ = [os.path.join(sys.argv[3], *name.split("."))]
    sys.modules[name] = pkg
from fqt_compiler.runtime import jit
results = []
for directory, const in json.loads(sys.argv[1]):
    os.environ["FQT_CACHE_DIR"] = directory
    lib = jit.compile_ir(sys.argv[2].replace("{const}", str(const)), "host")
    probe = lib.function("fqt_cache_probe", ctypes.c_int64, ctypes.c_int64)
    results.append([lib.from_cache, probe(1)])
print(json.dumps(results))
"""


def start(jobs):
    args = [sys.executable, "-c", SCRIPT, json.dumps([[str(d), c] for d, c in jobs]), IR, str(ROOT)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc):
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return [tuple(r) for r in json.loads(out)]


def run(jobs):
    return finish(start(jobs))


def entry(directory: Path, const: int) -> Path:
    return directory / f"{jit._cache_key(IR.replace('{const}', str(const)), host_target())}.o"


@pytest.fixture(scope="module")
def damage_runs(tmp_path_factory):
    """Populate entries, damage some, and record what two later fresh processes see."""
    good, bad = tmp_path_factory.mktemp("good"), tmp_path_factory.mktemp("bad")
    open_dir, foreign = tmp_path_factory.mktemp("open"), tmp_path_factory.mktemp("foreign")
    first = run([(good, 1), (bad, 2), (bad, 3), (bad, 4), (bad, 5), (open_dir, 6), (foreign, 7)])
    blob = entry(bad, 2).read_bytes()
    entry(bad, 2).write_bytes(blob[: len(blob) // 2])                     # truncated
    corrupt = bytearray(entry(bad, 3).read_bytes())
    corrupt[-40] ^= 0xFF                                                  # one flipped code byte
    entry(bad, 3).write_bytes(bytes(corrupt))
    entry(bad, 4).write_bytes(entry(bad, 5).read_bytes())                # another kernel's entry
    os.chmod(open_dir, 0o777)
    if os.getuid() == 0:
        os.chown(foreign, 65534, -1)
    stamps = {p: p.stat().st_mtime_ns for p in (entry(open_dir, 6), entry(foreign, 7))}
    second = run([(good, 1), (bad, 2), (bad, 3), (bad, 4), (open_dir, 6), (foreign, 7)])
    third = run([(bad, 2), (bad, 3), (bad, 4)])
    return first, second, third, stamps


def test_second_process_loads_from_disk(damage_runs):
    first, second, _, _ = damage_runs
    assert first[0] == (False, 2)
    assert second[0] == (True, 2)


def test_damaged_entries_are_rebuilt_not_executed(damage_runs):
    _, second, third, _ = damage_runs
    assert second[1:4] == [(False, 3), (False, 4), (False, 5)]
    assert third == [(True, 3), (True, 4), (True, 5)]       # rewritten as valid entries


def test_unsafe_directories_are_not_used(damage_runs):
    _, second, _, stamps = damage_runs
    assert second[4] == (False, 7)                           # world-writable
    if os.getuid() == 0:
        assert second[5] == (False, 8)                       # owned by another user
    for path, stamp in stamps.items():
        assert path.stat().st_mtime_ns == stamp              # and not written to either


def test_concurrent_processes_compile_the_same_kernel(tmp_path):
    procs = [start([(tmp_path, 9)]) for _ in range(2)]
    results = [finish(p) for p in procs]
    assert [r[0][1] for r in results] == [10, 10]           # the later one may load the earlier's entry
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [entry(tmp_path, 9).name]               # one entry, no temporary left over
    key = entry(tmp_path, 9).stem
    assert jit._read_entry(entry(tmp_path, 9), key) is not None


def test_unsafe_cache_directory_is_not_used_and_warned_about(tmp_path, monkeypatch, caplog):
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    monkeypatch.setenv("FQT_CACHE_DIR", str(open_dir))
    ir = "define i64 @fqt_unsafe_probe(i64 %x) {\n  %y = add i64 %x, 4242\n  ret i64 %y\n}\n"
    with caplog.at_level(logging.WARNING, logger="fqt_compiler"):
        lib = jit.compile_ir(ir, "host")
    assert lib.function("fqt_unsafe_probe", ctypes.c_int64, ctypes.c_int64)(1) == 4243
    assert not lib.from_cache and list(open_dir.iterdir()) == []
    assert any(str(open_dir) in r.getMessage() and "not used" in r.getMessage()
               for r in caplog.records if r.name == "fqt_compiler.runtime.jit")
