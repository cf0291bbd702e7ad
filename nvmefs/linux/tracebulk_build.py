"""cffi's API-mode builder of nvmefs.linux.tracebulkext, the compiled trace consumer in tracebulk.c.

setup.py names it in `cffi_modules`, so `pip install .`, `pip install -e .` and a wheel build
compile it. It needs only a C compiler and Python's headers (no library): where it does not
build, the package installs without it and nvmefs.linux.tracebulk runs its Python consumer.
The declarations Python sees are the part of tracebulk.c between its cdef markers: one text.
"""

from __future__ import annotations

from pathlib import Path

import cffi

SOURCE = Path(__file__).with_name("tracebulk.c")
MODULE = "nvmefs.linux.tracebulkext"
# tracebulk.c compiles without a warning under these (tests/linux/test_tracebulk.py checks it
# alone with -Werror): hostile-input code is where a warning is most likely a bug.
CFLAGS = ["-O2", "-Wall", "-Wextra"]


def cdef_of(source: str) -> str:
    """The declarations between the `/* cdef-begin */` and `/* cdef-end */` markers."""
    start = source.index("/* cdef-begin */") + len("/* cdef-begin */")
    return source[start : source.index("/* cdef-end */")]


def builder() -> cffi.FFI:
    text = SOURCE.read_text()
    ffi = cffi.FFI()
    ffi.cdef(cdef_of(text))
    # The whole of tracebulk.c is the module's C source: cffi checks the declarations against it.
    ffi.set_source(MODULE, text, extra_compile_args=CFLAGS)
    return ffi


ffibuilder = builder()
