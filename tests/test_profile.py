"""Tests for uniap_jax.profile: calibration on the 8 CPU devices, fits, JSON, cache."""

import dataclasses
import itertools
import json
import math
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from uniap_jax import cost
from uniap_jax import profile
from uniap_jax import strategies
from uniap_jax.cluster import Cluster

import _toy_models as toy
import uniap_jax as ua

REPO = pathlib.Path(__file__).resolve().parent.parent
CPU = Cluster.preset("cpu-8")
# A tiny calibration: seconds on 8 virtual CPU devices.
TINY = dict(sizes_bytes=(4096, 65536, 262144), matmul_sizes=(128,),
            elementwise_bytes=(1 << 20,), repeats=3, iterations=4)


@pytest.fixture(scope="module")
def calibration():
  return profile.calibrate(CPU, jax.devices(), **TINY)


def _level_sse(cal, cluster, fit):
  ms = [m for m in cal.measurements if m.level == fit.name]
  c = profile._calibrate._with_level(cluster, fit.name, bandwidth_bytes_per_s=fit.bandwidth_bytes_per_s,
                          latency_s=fit.latency_s)
  return sum((profile.predicted_time_s(m, c) / m.time_s - 1.0) ** 2 for m in ms)


# ------------------------------------------------------------- on the devices


def test_tiny_calibration_gives_positive_finite_figures(calibration):
  cal = calibration
  assert cal.device_kind == "cpu" and cal.platform == "cpu" and cal.num_devices == 8
  assert cal.jax_version == jax.__version__
  assert 0 < cal.compute_efficiency <= 1
  assert math.isfinite(cal.memory_bandwidth_bytes_per_s) and cal.memory_bandwidth_bytes_per_s > 0
  assert [l.name for l in cal.levels] == ["host"]
  (bandwidth, latency), = cal.level_figures().values()
  assert math.isfinite(bandwidth) and bandwidth > 0
  assert math.isfinite(latency) and latency >= 0
  kinds = [(m.kind, m.nbytes) for m in cal.measurements if m.level == "host"]
  assert sorted({k for k, _ in kinds}) == sorted(profile.COLLECTIVE_KINDS)
  assert len(kinds) == len(profile.COLLECTIVE_KINDS) * len(TINY["sizes_bytes"])
  for m in cal.measurements:
    assert len(m.times_s) == TINY["repeats"]
    assert all(math.isfinite(t) and t > 0 for t in m.times_s)
    if m.level:
      assert m.group_size == 8 and m.count == TINY["iterations"]


def test_collective_sizes_follow_xla_convention(calibration):
  # nbytes is the larger of operand and result per device: the requested size,
  # rounded to whole float32 elements split 8 ways.
  for m in calibration.measurements:
    if m.level:
      assert m.nbytes in TINY["sizes_bytes"]


def test_level_fit_is_the_least_squares_optimum(calibration):
  """No nearby figures, nor the preset's, reproduce the measured times better."""
  cal = calibration
  for fit in cal.levels:
    best = _level_sse(cal, CPU, fit)
    preset = CPU.levels[0]
    if fit.bandwidth_fitted:  # else the bandwidth is a bound, not a fit
      assert best <= _level_sse(cal, CPU, dataclasses.replace(
          fit, bandwidth_bytes_per_s=preset.bandwidth_bytes_per_s,
          latency_s=preset.latency_s)) * (1 + 1e-9)
    bandwidth_factors = (0.9, 1.0, 1.1) if fit.bandwidth_fitted else (1.0,)
    for fb, fl in itertools.product(bandwidth_factors, (0.9, 1.0, 1.1)):
      other = dataclasses.replace(fit, bandwidth_bytes_per_s=fit.bandwidth_bytes_per_s * fb,
                                  latency_s=fit.latency_s * fl)
      assert best <= _level_sse(cal, CPU, other) * (1 + 1e-9), (fb, fl)


def test_compute_fit_reproduces_single_sizes(calibration):
  """One matmul and one elementwise size: the calibrated roofline gives their times."""
  cal = calibration
  calibrated = cal.apply(CPU)
  for m in cal.measurements:
    if m.kind == "elementwise" or (m.kind == "matmul" and cal.compute_efficiency < 1):
      assert profile.predicted_time_s(m, calibrated) == pytest.approx(m.time_s, rel=1e-9)


def test_summary_lists_figures_and_every_measurement(calibration):
  text = calibration.summary(CPU)
  assert "compute_efficiency" in text and "host.latency_s" in text
  assert len(text.splitlines()) == 6 + 1 + len(calibration.measurements) + len(calibration.notes)


# ------------------------------------------------------------------- the fits


def _ring_time_s(kind, k, nbytes, latency_s, bandwidth_bytes_per_s):
  """The ring alpha-beta model, written out by hand (one level, no torus)."""
  steps = {"all-reduce": 2 * (k - 1), "all-gather": k - 1, "reduce-scatter": k - 1,
           "all-to-all": k - 1, "send": 1}[kind]
  share = {"all-reduce": 2 * (k - 1) / k, "send": 1.0}.get(kind, (k - 1) / k)
  return steps * latency_s + share * nbytes / bandwidth_bytes_per_s


def _synthetic(kind, nbytes, time_s, level="host", k=8):
  return profile.Measurement(kind=kind, level=level, group_size=k, dtype="float32",
                             nbytes=nbytes, times_s=(time_s,))


def test_predicted_time_is_the_cost_models_ring_formula():
  lvl = CPU.levels[0]
  for kind in profile.COLLECTIVE_KINDS:
    m = _synthetic(kind, 1e6, 1.0)
    assert profile.predicted_time_s(m, CPU) == pytest.approx(
        _ring_time_s(kind, 8, 1e6, lvl.latency_s, lvl.bandwidth_bytes_per_s), rel=1e-12)


@pytest.mark.parametrize("noise", [0.0, 0.1])
def test_fit_level_recovers_known_alpha_beta(noise):
  latency_s, bandwidth = 3e-6, 2e9
  rng = np.random.default_rng(0)
  ms = [_synthetic(kind, n, _ring_time_s(kind, 8, n, latency_s, bandwidth)
                   * math.exp(noise * rng.standard_normal()))
        for kind in profile.COLLECTIVE_KINDS for n in (1e3, 1e4, 1e5, 1e6, 1e7)]
  fit = profile.fit_level(ms, CPU, "host")
  tolerance = 1e-9 if noise == 0 else 0.3
  assert fit.bandwidth_fitted
  assert fit.latency_s == pytest.approx(latency_s, rel=tolerance)
  assert fit.bandwidth_bytes_per_s == pytest.approx(bandwidth, rel=tolerance)


def test_fit_level_honours_a_torus():
  cluster = Cluster.preset("tpu-v5p-128")
  level = cluster.levels[0]
  assert level.torus
  ms = [_synthetic(kind, n, _ring_time_s(kind, level.size, n, 1e-6, 2 * 7e10),
                   level=level.name, k=level.size)
        for kind in ("all-reduce", "all-gather") for n in (1e4, 1e6, 1e8)]
  fit = profile.fit_level(ms, cluster, level.name)
  # A torus ring runs both directions: the per-direction figure is half.
  assert fit.bandwidth_bytes_per_s == pytest.approx(7e10, rel=1e-9)
  assert fit.latency_s == pytest.approx(1e-6, rel=1e-9)


def test_fit_level_without_latency_clips_it_to_zero():
  # Times below the bandwidth line by a constant: a negative intercept.
  ms = [_synthetic("all-gather", n, 7 / 8 * n / 1e9 - 1e-6) for n in (1e4, 1e5, 1e6)]
  fit = profile.fit_level(ms, CPU, "host")
  assert fit.latency_s == 0.0 and fit.bandwidth_fitted and fit.bandwidth_bytes_per_s > 0


def test_fit_level_flat_times_give_a_bandwidth_lower_bound():
  ms = [_synthetic("all-reduce", n, 1e-3 * (1.5 if n < 1e5 else 1.0)) for n in (1e3, 1e6)]
  fit = profile.fit_level(ms, CPU, "host")
  assert not fit.bandwidth_fitted
  # The largest all-reduce moves 2 * 7/8 * 1e6 bytes in 1 ms at most.
  assert fit.bandwidth_bytes_per_s == pytest.approx(2 * 7 / 8 * 1e6 / 1e-3, rel=1e-12)
  assert fit.latency_s > 0


def test_fit_compute_recovers_known_efficiency_and_bandwidth():
  efficiency, bandwidth = 0.25, 3e9
  peak = CPU.peak_flops("float32")
  ms = [profile.Measurement(kind="matmul", dtype="float32", flops=2 * s**3,
                            nbytes=12 * s * s, times_s=(2 * s**3 / peak / efficiency,))
        for s in (256, 512)]
  ms += [profile.Measurement(kind="elementwise", dtype="float32", flops=n / 12, nbytes=n,
                             times_s=(n / bandwidth,)) for n in (1e6, 1e7)]
  eff, bw, notes = profile.fit_compute(ms, CPU)
  assert eff == pytest.approx(efficiency, rel=1e-9)
  assert bw == pytest.approx(bandwidth, rel=1e-9)
  assert notes == ()


def test_fit_compute_clips_efficiency_above_peak():
  peak = CPU.peak_flops("float32")
  ms = [profile.Measurement(kind="matmul", dtype="float32", flops=1e9, nbytes=1e3,
                            times_s=(1e9 / peak / 2,)),
        profile.Measurement(kind="elementwise", dtype="float32", flops=1e3, nbytes=1e7,
                            times_s=(1e-2,))]
  eff, _, notes = profile.fit_compute(ms, CPU)
  assert eff == 1.0
  assert "clipped to 1" in notes[0]


# --------------------------------------------------------- JSON and applying


def _fake(device_kind="NVIDIA A100-SXM4-40GB", levels=(("nvlink", 2.5e11, 3e-6),)):
  return profile.Calibration(
      device_kind=device_kind, num_devices=8, platform="gpu", jax_version="0.10.2",
      compute_efficiency=0.5, memory_bandwidth_bytes_per_s=1.4e12,
      levels=tuple(profile.LevelFit(name=n, bandwidth_bytes_per_s=b, latency_s=l)
                   for n, b, l in levels),
      measurements=(_synthetic("send", 1e6, 1e-5, level="nvlink"),), notes=("a note",))


def test_json_round_trip(calibration):
  for cal in (calibration, _fake()):
    text = cal.to_json()
    assert profile.Calibration.from_json(text) == cal
    assert profile.Calibration.from_json(text).to_json() == text


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(calibration_schema_version=7), "calibration_schema_version 1"),
    (lambda d: d.pop("compute_efficiency"), "missing or unknown field"),
    (lambda d: d.update(colour="blue"), "missing or unknown field"),
    (lambda d: d.update(compute_efficiency=1.5), r"compute_efficiency must be in \(0, 1\]"),
    (lambda d: d["levels"][0].update(latency_s=-1.0), "latency_s must be a non-negative"),
    (lambda d: d["measurements"][0].update(kind="gather"), "Measurement.kind must be"),
])
def test_from_json_rejects_bad_input(edit, message):
  data = json.loads(_fake().to_json())
  edit(data)
  with pytest.raises(ValueError, match=message):
    profile.Calibration.from_json(json.dumps(data))
  with pytest.raises(ValueError, match="not valid JSON"):
    profile.Calibration.from_json("{")


def test_apply_changes_exactly_the_calibrated_fields():
  cluster = Cluster.preset("a100-40g-2x8")
  out = _fake().apply(cluster)
  assert out.compute_efficiency == 0.5
  assert out.memory_bandwidth_bytes_per_s == 1.4e12
  assert out.levels[0] == dataclasses.replace(cluster.levels[0], bandwidth_bytes_per_s=2.5e11,
                                              latency_s=3e-6)
  assert out.levels[1] == cluster.levels[1]  # infiniband was not calibrated
  for field in dataclasses.fields(Cluster):
    if field.name not in ("compute_efficiency", "memory_bandwidth_bytes_per_s", "levels"):
      assert getattr(out, field.name) == getattr(cluster, field.name), field.name


def test_apply_rejects_another_device_kind_or_level():
  with pytest.raises(ValueError, match="measured on 'NVIDIA A100-SXM4-40GB'.*'cpu'"):
    _fake().apply(CPU)
  with pytest.raises(ValueError, match=r"level\(s\) \['dcn'\] are not levels"):
    _fake(levels=(("dcn", 1e9, 1e-5),)).apply(Cluster.preset("a100-40g-1x8"))


# ---------------------------------------------------------------- the cache


@pytest.fixture
def counted_timer(monkeypatch):
  """Replaces the timing function by a counter that returns made-up times."""
  calls = []

  def fake(fn, args, repeats):
    calls.append(fn)
    return (1e-3,) * repeats

  monkeypatch.setattr(profile._calibrate, "_time_runs_s", fake)
  return calls


def test_cache_is_written_then_reused(tmp_path, counted_timer):
  path = tmp_path / "calibration.json"
  first = profile.calibrate_cached(CPU, path, jax.devices(), **TINY)
  measured = len(counted_timer)
  assert measured == (len(TINY["matmul_sizes"]) + len(TINY["elementwise_bytes"])
                      + len(profile.COLLECTIVE_KINDS) * len(TINY["sizes_bytes"]))
  assert profile.Calibration.from_json(path.read_text()) == first
  second = profile.calibrate_cached(CPU, path, jax.devices(), **TINY)
  assert len(counted_timer) == measured  # nothing measured again
  assert second == first


def test_cache_of_other_devices_is_measured_again(tmp_path, counted_timer):
  path = tmp_path / "calibration.json"
  path.write_text(_fake().to_json())
  with pytest.warns(UserWarning, match="overwriting"):
    cal = profile.calibrate_cached(CPU, path, jax.devices(), **TINY)
  assert counted_timer and cal.device_kind == "cpu"
  assert profile.Calibration.from_json(path.read_text()) == cal


def test_cache_never_overwrites_a_file_that_is_no_calibration(tmp_path, counted_timer):
  path = tmp_path / "cluster.json"
  path.write_text(CPU.to_json())
  with pytest.raises(ValueError, match="calibration_schema_version 1, got None.*Delete the"):
    profile.calibrate_cached(CPU, path, jax.devices(), **TINY)
  assert path.read_text() == CPU.to_json() and not counted_timer


# ------------------------------------------------------------------- errors


def test_calibrate_rejects_bad_arguments():
  with pytest.raises(ValueError, match=r"layers must be \(train_step, example_args\)"):
    profile.calibrate(CPU, layers=object())
  with pytest.raises(ValueError, match="4 devices given but cluster 'cpu-8' has 8"):
    profile.calibrate(CPU, jax.devices()[:4])
  with pytest.raises(ValueError, match="sizes_bytes must be a non-empty sequence"):
    profile.calibrate(CPU, sizes_bytes=(1024, -1))
  with pytest.raises(ValueError, match="repeats must be a positive int, got 0"):
    profile.calibrate(CPU, repeats=0)


def test_launcher_prints_fitted_and_preset_figures(tmp_path):
  out = tmp_path / "calib.json"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.calibrate", "--cluster=cpu-8", f"--out={out}",
       "--sizes_bytes=4096,65536", "--matmul_sizes=64", "--elementwise_bytes=65536",
       "--repeats=2", "--iterations=2"],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "analytic" in proc.stdout and "calibrated" in proc.stdout
  assert "host.bandwidth_bytes_per_s" in proc.stdout
  cal = profile.Calibration.from_json(out.read_text())
  assert cal.num_devices == 8 and cal.levels[0].name == "host"


# ------------------------------------------------------------------- layers


def _toy_step():
  model = toy.abstract_model(toy.TinyTransformer, hidden=(64, 64))
  return toy.nnx_train_step(toy.lm_loss), (model, toy.abstract_optimizer(model),
                                           toy.lm_batch(batch_size=8))


@pytest.fixture(scope="module")
def layer_calibration():
  step, args = _toy_step()
  return profile.calibrate(CPU, jax.devices(), **TINY, layers=(step, args), max_candidates=2)


def test_every_layer_kind_is_timed_alone_and_under_its_fastest_candidates():
  step, args = _toy_step()
  graph = ua.trace(step, *args)
  mesh = [m for m in strategies.mesh_shapes(CPU, 8) if len(m.axes) == 2][0]
  timings = profile.time_layers(step, *args, cluster=CPU, mesh=mesh, max_candidates=2,
                                repeats=1)
  kinds = {}
  for layer in graph.layers:
    kinds.setdefault(layer.signature, []).append(layer.name)
  alone = [t for t in timings if not t.mesh]
  assert [t.layer for t in alone] == [names[0] for names in kinds.values()]
  assert [t.count for t in alone] == [len(names) for names in kinds.values()]
  # Under candidates: the cost tables' two fastest, with their figures as the prediction.
  tables = cost.build_cost_tables(graph, CPU, mesh=mesh)
  for names in kinds.values():
    costs = tables.layer(names[0])
    total = [m + s for m, s in zip(costs.microbatch_time_s, costs.step_time_s)]
    fastest = sorted(range(len(total)), key=total.__getitem__)[:2]
    timed = [t for t in timings if t.mesh and t.layer == names[0]]
    assert all(t.mesh == mesh.as_dict() for t in timed)
    assert [t.candidate for t in timed] == [costs.candidates[k].name for k in fastest]
    assert [t.predicted_s for t in timed] == pytest.approx([total[k] for k in fastest])
  assert all(t.time_s > 0 and len(t.times_s) == 1 for t in timings)


def test_layer_calibration_fits_efficiency_to_the_layers_and_round_trips(layer_calibration):
  step, args = _toy_step()
  graph = ua.trace(step, *args)
  cal = layer_calibration
  kernels_only = dataclasses.replace(cal, layers=(), compute_efficiency=1.0)
  assert cal.compute_efficiency == pytest.approx(profile.fit_layer_efficiency(
      graph, cal.layers, kernels_only.apply(CPU)), rel=1e-6)
  assert any("fitted to" in n and "layer kind" in n for n in cal.notes)
  assert profile.Calibration.from_json(cal.to_json()) == cal
  text = cal.summary(CPU)
  assert all(t.layer in text for t in cal.layers) and "one device" in text


@pytest.mark.parametrize("efficiency", [0.05, 0.3, 0.9])
def test_fit_layer_efficiency_recovers_a_known_efficiency(efficiency):
  step, args = _toy_step()
  graph = ua.trace(step, *args)
  # Compute-bound figures, so that every op's time depends on the efficiency.
  fast_memory = dataclasses.replace(CPU, memory_bandwidth_bytes_per_s=1e15)
  truth = dataclasses.replace(fast_memory, compute_efficiency=efficiency)
  template = [profile.LayerTiming(layer=l.name, predicted_s=0.0, times_s=(1.0,))
              for l in graph.layers]
  exact = profile.predict_layers(graph, template, truth)
  timings = [dataclasses.replace(t, times_s=(t.predicted_s,)) for t in exact]
  assert profile.fit_layer_efficiency(graph, timings, fast_memory) == pytest.approx(
      efficiency, rel=1e-3)


def test_time_layers_rejects_bad_input():
  step, args = _toy_step()
  with pytest.raises(ValueError, match="repeats must be"):
    profile.time_layers(step, *args, cluster=CPU, repeats=0)
  with pytest.raises(ValueError, match="needs 8 devices; 4 given"):
    profile.time_layers(step, *args, cluster=CPU, devices=jax.devices()[:4],
                        mesh=strategies.mesh_shapes(CPU, 8)[0])
  with pytest.raises(ValueError, match="needs one-device layer timings"):
    profile.fit_layer_efficiency(ua.trace(step, *args), [], CPU)
