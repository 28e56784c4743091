"""The clusters the launchers take: a preset name, a cluster JSON file, or "devices"."""

import uniap_jax as ua


def from_flag(text: str) -> ua.Cluster:
  """`--cluster`: "devices" describes the devices JAX sees (`Cluster.from_devices`), a
  path ending in .json is a cluster file (`Cluster.from_json`), anything else a preset."""
  if text == "devices":
    return ua.Cluster.from_devices()
  if text.endswith(".json"):
    return ua.Cluster.from_json(text)
  return ua.Cluster.preset(text)
