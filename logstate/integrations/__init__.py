"""State backends for stream processors, on logstate (see docs/integrations.md).

- :mod:`logstate.integrations.quixstreams`: a Quix Streams 3 store (extra ``quix``).
- :mod:`logstate.integrations.faust`: a Faust store, ``store="logstate://..."``
  (extra ``faust``; registered through the ``faust.stores`` entry point).

Each module imports its stream processor; this package imports neither.
"""
