"""The embedded iSCSI portal (RFC 7143, ERL 0): sans-I/O PDU framing and state, one socket module."""
