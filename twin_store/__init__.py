"""twin_store: the twins' state, by role.

- ``models``: the twin models (LSTM forecaster, UTT networks) and telemetry screens; plain torch/numpy.
- ``federation``: FedAvg, cluster/global twins, H-/V-twinning, DCS, the stream protocol, keys, screening
  defenses, the ``twin.models`` codec; plain Python, no Kafka or InfluxDB.
- ``adapters``: the InfluxDB client, line protocol and points, provisioning of database and topics.
- ``services``: the long-running commands (``store``, ``htwin``, ``vtwin``, ``twin``) assembling the rest.
"""
