"""The LIO frontend's userspace half: the TCMU handler for backstores of subtype ``lazy``."""
