"""A PDU and CDB fuzzer for the embedded portal (issue 14, acceptance item 3).

It is an initiator of its own, written from RFC 7143 section 11 without importing lazyiscsi's
PDU code (a bug there must not be copied into the tool meant to find it): ``wire`` builds and
parses PDUs, ``initiator`` is one connection on gevent sockets, ``cdbs`` makes boundary and
random CDBs, ``mutate`` damages PDUs and PDU sequences, ``corpus`` holds the valid sessions
that are mutated, and ``campaign`` runs a ``lazyiscsi serve`` subprocess, many fuzzing lanes and
one well-behaved session beside them, and says what went wrong. Every random choice comes
from a seed that is printed, so a failure can be replayed.
"""
