"""lazyiscsi's branch of the targetcli tree: ``/lazy`` as configshell-fb nodes.

targetcli has no plugin hook, so ``lazyiscsi shell`` is the host: it builds targetcli's own tree
(``targetcli.UIRoot``, where targetcli-fb is installed and LIO is there) and hangs ``/lazy`` on
it, or a root holding only ``/lazy`` elsewhere. Every node talks to the daemon through its
control socket (``lazyiscsi.control.call``), never to its files.

Dependencies point one way: this package imports lazyiscsi's control client; lazyiscsi's CLI
imports this package only when ``lazyiscsi shell`` runs, so lazyiscsi works without
configshell-fb.

- ``framework``: which configshell module the nodes subclass (the one targetcli uses);
- ``client``: the daemon as the nodes ask it (a refusal becomes configshell's ExecutionError);
- ``nodes``: ``/lazy`` and one node per volume, with their verbs, summaries and completions;
- ``shell``: the shell, its tree, one-shot and interactive use.
"""
