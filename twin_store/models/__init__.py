"""twin_store/models."""
