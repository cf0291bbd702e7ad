"""Only what setup.cfg cannot say: the compiled modules, built by cffi at install time if they can.

Both are optional: where one does not build, the build says so in one line and the package
installs without it.
- The passthrough loop (nvmefs/linux/bulk.c) needs liburing's headers and a C compiler. Without
  it nvmefs takes its Python data path (`datapath=auto`), and `datapath=compiled` is refused
  with the reason.
- The trace consumer (nvmefs/linux/tracebulk.c) needs only a C compiler and Python's headers.
  Without it the kernel source reads trace pages with its Python consumer.
"""

import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, ExecError, LinkError, PlatformError

# What a build without the headers, the library or a compiler fails with.
BUILD_ERRORS = (CCompilerError, CompileError, ExecError, LinkError, PlatformError, OSError)

# What each optional module is, and what to install to have it: by its module name.
WHAT = {
    "nvmefs.linux.bulkext": (
        "the compiled passthrough loop",
        "install liburing's headers (Debian/Ubuntu: liburing-dev, RHEL/Fedora: liburing-devel)"
        " and a C compiler to have it",
    ),
    "nvmefs.linux.tracebulkext": (
        "the compiled trace consumer",
        "install a C compiler and Python's headers (Debian/Ubuntu: gcc, python3-dev) to have it",
    ),
}


class OptionalBuildExt(build_ext):
    """build_ext for which an extension that does not compile is left out, not fatal."""

    def build_extension(self, ext):  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except BUILD_ERRORS as e:
            if isinstance(e, CompileError | CCompilerError | ExecError):
                reason = "it does not compile here"
            elif isinstance(e, LinkError):
                reason = "it does not link here"
            else:
                reason = str(e)[:200] or type(e).__name__
            what, remedy = WHAT.get(ext.name, (f"the compiled module {ext.name}", ""))
            print(
                f"nvmefs: building without {what} ({ext.name}: {reason})"
                + (f"; {remedy}" if remedy else ""),
                file=sys.stderr,
            )


setup(
    cmdclass={"build_ext": OptionalBuildExt},
    cffi_modules=[
        "nvmefs/linux/bulk_build.py:ffibuilder",
        "nvmefs/linux/tracebulk_build.py:ffibuilder",
    ],
)
