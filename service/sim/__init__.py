"""Simulators for the demo and the tests: synthetic camera frames and the PLC side."""
