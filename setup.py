"""Only what setup.cfg cannot say: the compiled loop, built by cffi at install time if it can be.

The loop (nvmefs/linux/bulk.c) is optional: without liburing's headers or a C compiler the
build says so in one line and the package installs without it. nvmefs then takes its Python
data path (`datapath=auto`), and `datapath=compiled` is refused with the reason.
"""

import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, ExecError, LinkError, PlatformError

# What a build without the headers, the library or a compiler fails with.
BUILD_ERRORS = (CCompilerError, CompileError, ExecError, LinkError, PlatformError, OSError)


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
            print(
                f"nvmefs: building without the compiled passthrough loop ({ext.name}: {reason});"
                " install liburing's headers (Debian/Ubuntu: liburing-dev, RHEL/Fedora:"
                " liburing-devel) and a C compiler to have it",
                file=sys.stderr,
            )


setup(
    cmdclass={"build_ext": OptionalBuildExt},
    cffi_modules=["nvmefs/linux/bulk_build.py:ffibuilder"],
)
