"""Edge-cloud twins (DITEN): energy closed forms, the simulator, the gamma sub-problem, association policies.

Pure numpy (and torch through ``twin_store.models.diten_agents`` for the learned policies); no I/O.
"""
