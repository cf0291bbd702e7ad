"""Only what setup.cfg cannot say: the compiled loop, built by cffi at install time."""

from setuptools import setup

setup(cffi_modules=["nvmefs/linux/bulk_build.py:ffibuilder"])
