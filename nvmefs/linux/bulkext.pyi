# The compiled module cffi builds from bulk.c (nvmefs/linux/bulk_build.py): its `ffi` and `lib`.
from typing import Any

ffi: Any
lib: Any
