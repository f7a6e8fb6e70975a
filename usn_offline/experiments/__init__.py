"""Experiments that drive several stages at once: the comparison of pruning methods
(prune, then certify each network) and the USN-vs-engine cross-check. They sit above
``prune`` and ``certify``, which do not import them."""
