"""lazyiscsi: iSCSI LUNs whose data is fetched lazily from a remote source site."""

__version__ = "0.1.0"
