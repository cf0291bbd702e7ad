"""cffi's API-mode builder of nvmefs.linux.bulkext, the compiled loop in bulk.c (with liburing).

setup.py names it in `cffi_modules`, so `pip install .`, `pip install -e .` and a wheel build
compile it (gcc, python3-dev and liburing-dev needed at build time; liburing2 at run time).
The declarations Python sees are the part of bulk.c between its cdef markers: one text for both.
"""

from __future__ import annotations

from pathlib import Path

import cffi

SOURCE = Path(__file__).with_name("bulk.c")
MODULE = "nvmefs.linux.bulkext"


def cdef_of(source: str) -> str:
    """The declarations between the `/* cdef-begin */` and `/* cdef-end */` markers."""
    start = source.index("/* cdef-begin */") + len("/* cdef-begin */")
    return source[start : source.index("/* cdef-end */")]


def builder() -> cffi.FFI:
    text = SOURCE.read_text()
    ffi = cffi.FFI()
    ffi.cdef(cdef_of(text))
    # The whole of bulk.c is the module's C source: cffi checks the declarations above against it.
    ffi.set_source(MODULE, text, libraries=["uring"], extra_compile_args=["-O2", "-Wall"])
    return ffi


ffibuilder = builder()
