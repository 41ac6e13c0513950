"""twin_store/federation."""
