"""The NVMe protocol without I/O: layouts, tables, the status translator, queue state."""
