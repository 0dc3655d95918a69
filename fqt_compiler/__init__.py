"""fqt-compiler: 1-bit fully quantized training on CPUs (``import fqt_compiler as fqt``)."""
from . import debug, ops
from .batchnorm import recalibrate_bn
from .cross import emit_kernels
from .compiler import FQTModule, compile
from .config import Config, Rule
from .report import dump, summary
from .checkpoint import load, save

debug.configure()

__all__ = ["Config", "FQTModule", "Rule", "compile", "dump", "emit_kernels", "load", "ops",
           "recalibrate_bn", "save", "summary"]
