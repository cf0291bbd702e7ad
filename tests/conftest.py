from __future__ import annotations

import os

# tests/vm runs inside the QEMU VM (tests/test_vm.py boots it); on the host it is not collected.
collect_ignore = [] if os.environ.get("NVMEFS_IN_VM") else ["vm"]
