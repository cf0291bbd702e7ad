"""The FUSE filesystem over the recorder: the operations (ops.py), thin on purpose, and the
open handles' bookkeeping and bounds (handles.py)."""

from nvmefs.fs.ops import NvmeFS

__all__ = ["NvmeFS"]
