"""fqt-compiler: 1-bit fully quantized training on CPUs (``import fqt_compiler as fqt``)."""
from . import ops
from .codegen.aot import emit_kernels
from .compiler import FQTModule, compile
from .config import Config, Rule
from .report import dump, summary

__all__ = ["Config", "FQTModule", "Rule", "compile", "dump", "emit_kernels", "ops", "summary"]
