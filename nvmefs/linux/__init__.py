"""What talks to the running kernel: sysfs discovery, io_uring, the passthrough ABI."""
