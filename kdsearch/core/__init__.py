"""The bottom layer: the error type, the generic registry, the task kinds, the content-addressed store, safe tensor
reading, console and provenance helpers. Imports nothing else of kdsearch."""
