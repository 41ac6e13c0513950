"""The twin models: the LSTM traffic forecaster, the UTT networks and the telemetry screens. No I/O."""
