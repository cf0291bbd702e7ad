"""Trio engines: what they share (completion path, retry rule, state machine), the
register-level engine and the kernel-passthrough engine."""
