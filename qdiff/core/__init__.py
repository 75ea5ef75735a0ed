"""The ground every layer stands on: errors, artifacts and manifests, metrics, progress,
conditioning, the version. It imports nothing of qdiff above it (tests/test_layering.py)."""
