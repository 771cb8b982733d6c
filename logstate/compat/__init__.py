"""Compatibility with the legacy Quix Streams (0.5.x) state API.

- :mod:`logstate.compat.quixstreams`: drop-in ``LocalFileStorage``,
  ``InMemoryStorage``, ``StateValue`` and ``StateType`` for code written
  against ``quixstreams.state``; the legacy key semantics on logstate's engine.
- :mod:`logstate.compat.quix_import`: reads a legacy state directory (one
  file per key) into a logstate storage.

See docs/migrating-from-quix.md. Nothing is imported here, so importing one
module does not load the other.
"""
