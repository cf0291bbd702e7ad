"""The NVMe protocol without I/O: layouts, codes and names, the status translator, the log
policy, queue state, command builders, PRPs, registers and the kernel's disposition rule."""
