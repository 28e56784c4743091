"""Launchers and the model zoo used to measure uniap_jax."""
