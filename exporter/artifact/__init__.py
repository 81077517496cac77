"""The artifact directory: staging and the manifest, golden outputs, the report (no torch)."""
