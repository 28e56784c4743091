"""Calibration: the cost model's device figures, measured on the devices at hand.

`calibrate` times kernels and collectives and fits the figures a `Cluster` holds
(`_calibrate.py`); with `layers=`, it also times the step's own layer kinds, whole and
under their candidates, and fits the compute efficiency to them (`_layers.py`).
Planning never needs this package: the analytic figures always work.
"""

from uniap_jax.profile._calibrate import COLLECTIVE_KINDS as COLLECTIVE_KINDS
from uniap_jax.profile._calibrate import COMPUTE_KINDS as COMPUTE_KINDS
from uniap_jax.profile._calibrate import SCHEMA_VERSION as SCHEMA_VERSION
from uniap_jax.profile._calibrate import Calibration as Calibration
from uniap_jax.profile._calibrate import LevelFit as LevelFit
from uniap_jax.profile._calibrate import Measurement as Measurement
from uniap_jax.profile._calibrate import calibrate as calibrate
from uniap_jax.profile._calibrate import calibrate_cached as calibrate_cached
from uniap_jax.profile._calibrate import fit_compute as fit_compute
from uniap_jax.profile._calibrate import fit_level as fit_level
from uniap_jax.profile._calibrate import predicted_time_s as predicted_time_s
from uniap_jax.profile._layers import LayerTiming as LayerTiming
from uniap_jax.profile._layers import fit_layer_efficiency as fit_layer_efficiency
from uniap_jax.profile._layers import predict as predict_layers
from uniap_jax.profile._layers import time_layers as time_layers
