"""twin_store/adapters."""
