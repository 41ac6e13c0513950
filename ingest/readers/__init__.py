"""Readers of data sets: Milan traffic, sensor CSVs, FTM/IMU walks, simulated vision. Bad input becomes dead letters."""
