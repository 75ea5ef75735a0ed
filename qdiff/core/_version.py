"""The package version, in a leaf module.

`qdiff/__init__.py` re-exports it and `qdiff.core.artifacts` records it in every manifest; keeping it
here (importing nothing) lets the ground layer read it without importing the front door.
"""

__version__ = "0.1.0"
