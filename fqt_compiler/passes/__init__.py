"""Graph passes, one per file, run in this order by ``compiler.py``:

capture (Dynamo's torch-level graph): annotate_layers -> apply_plan -> rewrite_binary_layers
                                      -> fuse_dropout [-> fuse_regions, kernel backend]
forward (AOTAutograd's ATen graph):   name_placeholders [-> fold_alpha, kernel backend]
                                      -> annotate_fqt_nodes -> bind_implementations
backward:                             name_placeholders -> insert_gradient_quantizers
                                      [-> fuse_gradient_quantizers -> fold_alpha
                                       -> merge_gradient_paths, kernel backend]
                                      -> annotate_fqt_nodes -> bind_implementations
"""
from .annotate_fqt_nodes import annotate_fqt_nodes
from .annotate_layers import annotate_layers
from .apply_plan import apply_plan
from .bind_implementations import bind_implementations
from .fold_alpha import fold_alpha
from .fuse_dropout import fuse_dropout
from .fuse_gradient_quantizers import fuse_gradient_quantizers
from .fuse_regions import fuse_regions
from .infra import PassManager, PassRecord, PassResult, graph_text, is_symbolic
from .insert_gradient_quantizers import insert_gradient_quantizers
from .merge_gradient_paths import merge_gradient_paths
from .name_placeholders import name_placeholders
from .rewrite_binary_layers import rewrite_binary_layers

__all__ = ["PassManager", "PassRecord", "PassResult", "graph_text", "is_symbolic", "annotate_fqt_nodes",
           "annotate_layers", "apply_plan", "bind_implementations", "fold_alpha",
           "fuse_dropout", "fuse_gradient_quantizers", "fuse_regions", "insert_gradient_quantizers", "merge_gradient_paths",
           "name_placeholders", "rewrite_binary_layers"]
