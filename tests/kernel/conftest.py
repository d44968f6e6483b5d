"""The in-guest tests run only inside the kernel-tier guest (tests/kernel/guest/run.sh sets
LAZYISCSI_IN_GUEST); on the host, tier.py boots the guest and runs them there, and
test_guest.py checks what they reported."""

import os

collect_ignore = [] if os.environ.get("LAZYISCSI_IN_GUEST") else ["inguest"]
