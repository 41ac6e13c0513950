"""The worker's Faust agents, one module each; ``register(ctx)`` adds an agent to the app."""
