"""Adapters to the outside: the InfluxDB client, line protocol, points from features, provisioning."""
