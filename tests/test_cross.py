"""Cross-targeting (issue 5): emitted kernels for rpi4/rpi5/hygon, replayed on the target CPU
(natively or under qemu) against the host kernels, and the hygon kernels in a normal step."""
from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from fqt_compiler.codegen import aot
from fqt_compiler.codegen.targets import get_target
from fqt_compiler.verify import PACKAGES, verify
from fqt_compiler.zoo import resnet18_cifar

needs_cross = pytest.mark.skipif(
    not (shutil.which("qemu-aarch64-static") and shutil.which("aarch64-linux-gnu-gcc")),
    reason=f"needs Debian packages {PACKAGES}")


def _x():
    torch.manual_seed(0)
    return (torch.randn(2, 3, 32, 32),)


@needs_cross
@pytest.mark.slow
@pytest.mark.parametrize("target", ["rpi4", "rpi5", "hygon"])
def test_resnet18_step_kernels_verify_on_target(target, tmp_path):
    results = verify(resnet18_cifar(), _x(), target, tmp_path)
    assert results and all(r.passed for r in results), [r for r in results if not r.passed]
    asm = (tmp_path / "fqt_kernels.s").read_text()
    if target == "rpi4":
        assert "cnt\tv" in asm and "udot" not in asm and "sdot" not in asm
        out = subprocess.run(["file", str(tmp_path / "fqt_kernels.o")], capture_output=True, text=True)
        assert "aarch64" in out.stdout
    if target == "hygon":
        assert "zmm" not in asm and "{%k" not in asm
