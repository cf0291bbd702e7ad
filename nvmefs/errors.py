"""Every exception nvmefs raises on purpose, in one hierarchy.

    NvmefsError
      UsageError        bad input or a setup nvmefs refuses: one line for the user, exit 2
                        (options, sources, mountpoints, fault plans, policies, status words...)
      EngineError       a controller could not be brought up (or back up)
      ProtocolError     a controller broke the queue protocol
      QueueFull         no free submission slot: wait for completions
      CommandError      a command that ended without an NVMe status: the host gave up on it
        CommandTimeout  no completion in time
        CommandAborted  failed by a controller reset or the engine stopping
        HostError       a negative passthrough result (-ENODEV, -EINTR, -EINVAL...)

The command line catches NvmefsError and prints its message: no traceback reaches a user.
"""

from __future__ import annotations

import errno as errno_mod
import os

# The command's name, and its exit statuses: success, errors found (scrub, watch), usage or setup.
PROG = "nvmefs"
EXIT_OK, EXIT_FOUND, EXIT_USAGE = 0, 1, 2


class NvmefsError(Exception):
    """Base of every error nvmefs raises on purpose."""


class UsageError(NvmefsError):
    """Input or setup refused before anything starts; the message is one line."""


class EngineError(NvmefsError):
    """The controller could not be brought up (or back up)."""


class ProtocolError(NvmefsError):
    """The controller broke the protocol: unknown/duplicate cid, SQ head out of range..."""


class QueueFull(NvmefsError):
    """No free SQ slot: the caller must wait for completions (back-pressure)."""


class CommandError(NvmefsError):
    """A command that ended without an NVMe status: the host, not the controller, ended it."""


class CommandTimeout(CommandError):
    """No completion within the command's timeout."""


class CommandAborted(CommandError):
    """Failed by a controller reset (passthrough's equivalent is -EINTR) or by shutdown."""


class HostError(CommandError):
    """A negative passthrough result: the kernel, not the controller, failed the command."""

    def __init__(self, err: int) -> None:
        self.errno = err
        name = errno_mod.errorcode.get(err, str(err))
        super().__init__(f"-{name} ({os.strerror(err)})")
