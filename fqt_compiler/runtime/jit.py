"""JIT: LLVM IR text -> optimized machine code in this process, cached on disk.

One ``compile_ir`` call builds one module for one target. Object code is cached under
``$FQT_CACHE_DIR`` (default ``~/.cache/fqt_compiler``) by the hash of (IR, target,
llvmlite/LLVM version). Each entry stores a SHA-256 of its key and object bytes; an entry
whose checksum or key does not match is rebuilt, never loaded. Writes go to a temporary
file renamed into place, so concurrent processes never see a half-written entry. A cache
directory that another user owns or others may write is neither read nor written (a
warning is logged once): its objects could have been planted.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import re
import stat
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import llvmlite
import llvmlite.binding as llvm

from .. import events
from ..codegen.abi import KernelABI, KernelIR
from ..codegen.targets import Target, get_target, runs_on_host

_MAGIC = b"FQTOBJ1\n"
_lock = threading.Lock()
_memory: dict[str, "Library"] = {}
_warned: set[Path] = set()
log = logging.getLogger(__name__)


def cache_dir() -> Path | None:
    """The object cache directory, or None when ``FQT_CACHE_DIR`` is set to ``off``."""
    env = os.environ.get("FQT_CACHE_DIR")
    if env == "off":
        return None
    return Path(env) if env else Path.home() / ".cache" / "fqt_compiler"


def _safe_dir(path: Path) -> bool:
    """Only a directory owned by us and not writable by others may supply code to execute."""
    try:
        st = path.stat()
    except OSError:
        return False
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
            and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _cache_key(ir_text: str, target: Target) -> str:
    h = hashlib.sha256()
    for part in (ir_text, target.key, "jit-large-static", llvmlite.__version__,
                 ".".join(map(str, llvm.llvm_version_info))):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _read_entry(path: Path, key: str) -> bytes | None:
    try:
        blob = path.read_bytes()
    except OSError:
        return None
    head = len(_MAGIC) + 64 + 32
    if len(blob) < head or not blob.startswith(_MAGIC):
        return None
    stored_key = blob[len(_MAGIC):len(_MAGIC) + 64].decode("ascii", "replace")
    digest, obj = blob[len(_MAGIC) + 64:head], blob[head:]
    if stored_key != key or hashlib.sha256(key.encode() + obj).digest() != digest:
        return None
    return obj


def _write_entry(directory: Path, path: Path, key: str, obj: bytes) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not _safe_dir(directory):
            return
        digest = hashlib.sha256(key.encode() + obj).digest()
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC + key.encode() + digest + obj)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only or full disk only costs a recompile next time


def optimize(ir_text: str, target: Target) -> llvm.ModuleRef:
    """Parse and verify IR, then run LLVM's -O3 pipeline for the target."""
    mod = llvm.parse_assembly(ir_text)
    mod.triple = target.triple
    mod.verify()
    tm = target.create_target_machine()
    pb = llvm.create_pass_builder(tm, llvm.create_pipeline_tuning_options(speed_level=3))
    pb.getModulePassManager().run(mod, pb)
    return mod


def compile_object(ir_text: str, target: Target, *, jit: bool = False) -> bytes:
    """Relocatable object code for ``target`` (any target: used for AOT emission too);
    ``jit=True`` for code this process loads (see ``Target.create_target_machine``)."""
    mod = optimize(ir_text, target)
    return target.create_target_machine(jit=jit).emit_object(mod)


def compile_assembly(ir_text: str, target: Target) -> str:
    """The optimized module as target assembly, for reading generated kernels."""
    mod = optimize(ir_text, target)
    return target.create_target_machine().emit_assembly(mod)


@dataclass
class Library:
    """Loaded machine code of one module; keeps its ExecutionEngine alive."""

    key: str
    target: Target
    engine: llvm.ExecutionEngine
    from_cache: bool
    _functions: dict = field(default_factory=dict)

    def function(self, name: str, restype, *argtypes):
        """A ctypes callable for symbol ``name`` (ctypes releases the GIL during the call)."""
        sig = (name, restype, argtypes)
        if sig not in self._functions:
            addr = self.engine.get_function_address(name)
            if not addr:
                raise KeyError(f"symbol {name!r} not found in kernel module {self.key[:12]}")
            self._functions[sig] = ctypes.CFUNCTYPE(restype, *argtypes)(addr)
        return self._functions[sig]


def compile_ir(ir_text: str, target: str | Target = "host") -> Library:
    """Compile (or load from cache) an IR module and return the loaded ``Library``."""
    target = get_target(target)
    if not runs_on_host(target):
        raise ValueError(f"target {target.name!r} ({target.triple}, {target.cpu}) cannot run on this "
                         f"machine; use fqt.emit_kernels to build it ahead of time")
    key = _cache_key(ir_text, target)
    with _lock:
        if key in _memory:
            return _memory[key]
        directory = cache_dir()
        path = directory / f"{key}.o" if directory else None
        safe = path is not None and _safe_dir(directory)
        if path is not None and not safe and directory.exists() and directory not in _warned:
            _warned.add(directory)
            log.warning("kernel cache %s is not used: it must be a directory owned by this "
                        "user and not writable by group or others (chmod 700 it, or set "
                        "FQT_CACHE_DIR)", directory)
        obj = _read_entry(path, key) if safe else None
        from_cache = obj is not None
        if obj is None:
            obj = compile_object(ir_text, target, jit=True)
            if path is not None:
                _write_entry(directory, path, key, obj)
        engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), target.create_target_machine(jit=True))
        engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
        engine.finalize_object()
        lib = Library(key, target, engine, from_cache)
        _memory[key] = lib
        symbols = "+".join(re.findall(r'^define [^@]*@"?([\w.]+)"?\(', ir_text, re.M)[:2]) or "module"
        events.emit("kernel_compiled", ir_text=ir_text, symbols=symbols, key=key, target=target,
                    from_cache=from_cache)
        return lib


@dataclass(frozen=True)
class KernelSpec:
    """One kernel a runtime wrapper asks for: its family and named specialization options for
    a target, and the generated ``KernelIR`` (whose ABI gives the symbol and the ctypes
    argument types the kernel is called with). ``for_target`` regenerates it for another
    target."""

    family: str
    target: Target
    options: tuple                     # ((name, value), ...): the generator's keyword arguments
    kernel: KernelIR = field(repr=False)
    generate: object = field(repr=False, compare=False, hash=False)

    @property
    def symbol(self) -> str:
        return self.kernel.abi.symbol

    @property
    def ir_text(self) -> str:
        return self.kernel.text

    @property
    def abi(self) -> KernelABI:
        return self.kernel.abi

    @property
    def argtypes(self) -> tuple:
        return self.kernel.abi.argtypes

    def option(self, name: str):
        return dict(self.options)[name]

    def for_target(self, target: str | Target) -> "KernelSpec":
        return spec(self.family, get_target(target), self.generate, **dict(self.options))


@lru_cache(maxsize=None)
def spec(family: str, target: Target, generate, **options) -> KernelSpec:
    """The ``KernelSpec`` of ``generate(target, **options) -> KernelIR`` (one generator of
    ``codegen``), cached: a wrapper asks for the same spec on every call."""
    return KernelSpec(family, target, tuple(options.items()), generate(target, **options), generate)


@lru_cache(maxsize=None)
def _load(spec: KernelSpec):
    return compile_ir(spec.ir_text, spec.target).function(spec.symbol, None, *spec.argtypes)


_hooks: list = []


def hooked() -> bool:
    """Whether a ``kernel_hook`` is active (then wrappers must not serve kernels they cached)."""
    return bool(_hooks)


def kernel(spec: KernelSpec):
    """The callable for ``spec``: the single point where every runtime wrapper turns a kernel
    request into machine code, so ahead-of-time emission and cross-target verification can
    see (and, for a target this CPU cannot run, stand in for) every kernel a step needs."""
    if _hooks:
        return _hooks[-1](spec, _load)
    return _load(spec)


_memo: dict = {}


def kernel_of(family: str, target: str | Target, generate, **options):
    """``kernel(spec(family, get_target(target), generate, **options))``, memoized on these
    arguments as given: wrappers ask for their kernel on every call, once per layer and step,
    and building and hashing a ``Target`` and a ``KernelSpec`` each time is fixed cost on
    small layers. While a ``kernel_hook`` is active every request goes to the hook."""
    if _hooks:
        return kernel(spec(family, get_target(target), generate, **options))
    key = (family, target, generate, *options.items())
    fn = _memo.get(key)
    if fn is None:
        fn = _memo[key] = kernel(spec(family, get_target(target), generate, **options))
    return fn


@contextmanager
def kernel_hook(hook):
    """Route kernel requests through ``hook(spec, load) -> callable`` inside the block."""
    _hooks.append(hook)
    try:
        yield
    finally:
        _hooks.remove(hook)
