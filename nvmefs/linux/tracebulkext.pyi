# The compiled module cffi builds from tracebulk.c (nvmefs/linux/tracebulk_build.py): its `ffi`
# and `lib`.
from typing import Any

ffi: Any
lib: Any
