"""Compatibility with the legacy Quix Streams (0.5.x) state API.

- :mod:`logstate.compat.quixstreams`: drop-in ``LocalFileStorage``,
  ``InMemoryStorage``, ``StateValue`` and ``StateType`` for code written
  against ``quixstreams.state``; the legacy key semantics on logstate's engine.
- :mod:`logstate.compat.quix_import`: reads a legacy state directory (one
  file per key) into a logstate storage.
- :mod:`logstate.compat._legacy`: the legacy state file format itself
  (``StateType``, decoding one file's bytes, its errors); no I/O.

The three are layered in that order: each imports only those after it (the
import-linter contract in ``pyproject.toml``), so importing
:mod:`~logstate.compat.quixstreams` loads the importer (it refuses a legacy
directory), while importing the importer does not load the compat classes.
Nothing is imported here. See docs/migrating-from-quix.md.
"""
