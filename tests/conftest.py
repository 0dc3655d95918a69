"""What the test modules share: the targets they run kernels on, seeded data, a fresh Dynamo
state per test and the cross-tool skip. Import the constants with ``from conftest import ...``
(pytest puts this directory on ``sys.path``).

Tiers: ``pytest -m "not slow"`` is the fast loop; ``pytest`` (the README's command, what CI
runs) runs everything, the ``slow`` end-to-end and cross-target cases included. The README
runs them on two pytest-xdist workers (``-n 2``): most of the suite's time is Dynamo and
AOTAutograd compiling small models, one core's work per test.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from fqt_compiler.codegen.targets import PRESET_NAMES, get_target, runs_on_host
from fqt_compiler.cross.verify import PACKAGES
from fqt_compiler.ops.registry import BACKENDS  # noqa: F401  (re-exported for the tests)

# Every preset this CPU can execute (the GEMM kernels specialize per target and tile).
HOST_TARGETS = [t for t in PRESET_NAMES if runs_on_host(get_target(t))]
# The preprocessing kernels' code paths here: the host's, and AVX2 without AVX-512 (hygon).
KERNEL_TARGETS = [t for t in ("host", "hygon") if runs_on_host(get_target(t))]
# Targets the cross tests emit and replay (natively or under qemu).
CROSS_TARGETS = ["rpi4", "rpi5", "hygon"]

_cross_tools = pytest.mark.skipif(
    not (shutil.which("qemu-aarch64-static") and shutil.which("aarch64-linux-gnu-gcc")),
    reason=f"needs Debian packages {PACKAGES}")


def pytest_configure(config):
    """On an xdist worker, one torch (and so one kernel) thread unless a test asks for more:
    the workers already share the cores, and two workers with two threads each would
    oversubscribe them."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Dynamo remembers per forward code object (so across instances and fqt.compile calls)
    which input sizes changed, and under ``Config(dynamic="auto")`` a model class another
    test already ran at other sizes would compile dynamic from its first call: start every
    test as a new process would, so no test's graphs depend on the tests run before it."""
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def restore_threads():
    """A test that sets the thread count leaves the next test the count it found."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def needs_cross(test):
    """Mark a test ``cross`` and skip it, saying what to install, without the cross tools."""
    return pytest.mark.cross(_cross_tools(test))


def seeded_randn(*shape, seed: int = 0) -> torch.Tensor:
    """Standard normal data from its own generator (the global RNG is left alone)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
