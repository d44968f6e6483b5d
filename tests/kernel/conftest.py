"""The in-guest tests run only inside the kernel-tier guest (tests/kernel/guest/run.sh sets
LAZYISCSI_IN_GUEST); on the host, test_guest.py boots the guest and runs them there."""

import os

collect_ignore = [] if os.environ.get("LAZYISCSI_IN_GUEST") else ["inguest"]
