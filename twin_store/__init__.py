"""twin_store."""
