"""twin_store/services."""
