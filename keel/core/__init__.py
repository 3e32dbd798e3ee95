"""The bottom layer: `KeelError` and its one-line exit, atomic file writes, flags from dataclasses, text rules
(mentions, language), and the only network access (the hub). Imports nothing else from keel."""
