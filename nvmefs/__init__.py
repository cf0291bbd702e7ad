"""nvmefs: an NVMe error flight recorder in userspace."""

__version__ = "0.1.0"
