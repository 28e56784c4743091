"""Tests for uniap_jax.cluster: presets, JSON, from_devices, errors."""

import dataclasses
import json
import math
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uniap_jax import cluster as cluster_lib
from uniap_jax.cluster import Cluster, Level

GB = 10**9
GIB = 2**30

# Presets the project promises (issue 2 / DESIGN.md).
REQUIRED_PRESETS = (
    "a100-40g-1x8", "a100-40g-2x8", "a100-40g-4x4", "h100-80g-1x8",
    "h100-80g-8x8", "v100-32g-1x8", "titanxp-12g-1x8", "rtx3090-24g-1x8",
    "tpu-v4-32", "tpu-v5e-256", "tpu-v5p-128", "env_a", "env_b", "env_c",
    "cpu-8")


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  """What from_devices reads from a jax.Device."""

  device_kind: str
  process_index: int = 0
  platform: str = "gpu"


@dataclasses.dataclass(frozen=True)
class FakeTpu:
  device_kind: str
  process_index: int
  coords: tuple[int, int, int]
  slice_index: int = 0
  platform: str = "tpu"


def _json_dict(name="a100-40g-2x8"):
  return json.loads(Cluster.preset(name).to_json())


def _from(data):
  return Cluster.from_json(json.dumps(data))


# ---------------------------------------------------------------- all presets


def test_required_presets_exist_and_list_is_sorted():
  names = Cluster.presets()
  assert names == tuple(sorted(names))
  assert set(REQUIRED_PRESETS) <= set(names)


@pytest.mark.parametrize("name", Cluster.presets())
def test_preset_is_consistent(name):
  c = Cluster.preset(name)
  assert c.name == name
  assert c.num_devices == math.prod(l.size for l in c.levels)
  assert c.num_devices == c.num_nodes * c.devices_per_node
  assert c.peak_flops_per_s and all(v > 0 for v in c.peak_flops_per_s.values())
  assert c.memory_bytes > 0 and c.memory_bandwidth_bytes_per_s > 0
  assert 0 < c.compute_efficiency <= 1
  assert all(l.bandwidth_bytes_per_s > 0 and l.latency_s > 0 for l in c.levels)
  # Innermost first: bandwidth never grows outwards.
  bws = [l.bandwidth_bytes_per_s for l in c.levels]
  assert bws == sorted(bws, reverse=True)


@pytest.mark.parametrize("name", Cluster.presets())
def test_preset_json_round_trip_is_exact(name):
  c = Cluster.preset(name)
  text = c.to_json()
  back = Cluster.from_json(text)
  assert back == c
  assert back.to_json() == text
  assert hash(back) == hash(c)
  assert json.loads(text)["schema_version"] == 1


def test_json_round_trip_through_a_file(tmp_path):
  c = Cluster.preset("env_b")
  path = tmp_path / "cluster.json"
  path.write_text(c.to_json())
  assert Cluster.from_json(path) == c
  assert Cluster.from_json(str(path)) == c


# ------------------------------------ figures against reference/hardware.md

# (preset, dtype, TFLOP/s, memory bytes, memory GB/s, first level, GB/s)
# typed from reference/hardware.md.
HARDWARE_MD = [
    ("a100-40g-1x8", "bfloat16", 312, 40 * GB, 1555, "nvlink", 300),
    ("a100-40g-1x8", "float32", 19.5, 40 * GB, 1555, "nvlink", 300),
    ("h100-80g-1x8", "bfloat16", 989, 80 * GB, 3350, "nvlink", 450),
    ("h100-80g-1x8", "float32", 67, 80 * GB, 3350, "nvlink", 450),
    ("v100-32g-1x8", "float16", 125, 32 * GB, 900, "nvlink", 150),
    ("v100-32g-1x8", "float32", 15.7, 32 * GB, 900, "nvlink", 150),
    ("rtx3090-24g-1x8", "bfloat16", 71, 24 * GB, 936, "pcie", 25),
    ("rtx3090-24g-1x8", "float32", 35.6, 24 * GB, 936, "pcie", 25),
    ("titanxp-12g-1x8", "float32", 12.1, 12 * GB, 548, "pcie", 12),
    ("tpu-v4-32", "bfloat16", 275, 32 * GIB, 1200, "ici-x", 45),
    ("tpu-v5e-256", "bfloat16", 197, 16 * GIB, 810, "ici-x", 45),
    ("tpu-v5p-128", "bfloat16", 459, 95 * GIB, 2765, "ici-x", 90),
]


@pytest.mark.parametrize("name,dtype,tflops,mem,mem_gbs,level,link_gbs",
                         HARDWARE_MD)
def test_preset_figures_match_hardware_md(name, dtype, tflops, mem, mem_gbs,
                                          level, link_gbs):
  c = Cluster.preset(name)
  assert c.peak_flops(dtype) == pytest.approx(tflops * 1e12)
  assert c.memory_bytes == mem
  assert c.memory_bandwidth_bytes_per_s == pytest.approx(mem_gbs * 1e9)
  assert c.levels[0].name == level
  assert c.levels[0].bandwidth_bytes_per_s == pytest.approx(link_gbs * 1e9)


@pytest.mark.parametrize("name,ib_gbs", [
    ("a100-40g-2x8", 25),   # HDR 200 Gb/s, one NIC per GPU
    ("a100-40g-4x4", 25),
    ("env_c", 25),
    ("env_b", 12.5 / 4),    # EDR 100 Gb/s, one NIC per node of 4
])
def test_infiniband_level(name, ib_gbs):
  c = Cluster.preset(name)
  ib = c.levels[-1]
  assert ib.name == "infiniband" and ib.size == c.num_nodes
  assert ib.bandwidth_bytes_per_s == pytest.approx(ib_gbs * 1e9)


@pytest.mark.parametrize("name", Cluster.presets())
def test_latencies_follow_hardware_md(name):
  # "a few microseconds inside a node and tens across nodes".
  for level in Cluster.preset(name).levels:
    if level.name in ("infiniband", "dcn"):
      assert 1e-5 <= level.latency_s < 1e-4
    else:
      assert 1e-6 <= level.latency_s < 1e-5


@pytest.mark.parametrize("name,devices,nodes,dims,torus", [
    ("tpu-v4-32", 16, 4, (2, 2, 4), False),      # 2x2x4: a mesh
    ("tpu-v5p-128", 64, 16, (4, 4, 4), True),    # a full cube
    ("tpu-v5e-256", 256, 64, (16, 16), True),    # a full pod
])
def test_tpu_presets_count_chips_and_torus_dims(name, devices, nodes, dims,
                                                torus):
  c = Cluster.preset(name)
  assert c.num_devices == devices and c.num_nodes == nodes
  assert tuple(l.size for l in c.levels) == dims
  assert [l.name for l in c.levels] == ["ici-x", "ici-y", "ici-z"][:len(dims)]
  assert all(l.torus == torus for l in c.levels)


def test_paper_environments_keep_what_the_paper_states():
  env_c = Cluster.preset("env_c")
  assert (env_c.num_nodes, env_c.devices_per_node) == (4, 4)
  assert Cluster.preset("env_b").memory_bytes == 12 * GB
  for name in ("env_a", "env_b", "env_c"):
    assert "Assumed" in Cluster.preset(name).notes


def test_single_node_presets_have_no_inter_node_level():
  assert [l.name for l in Cluster.preset("a100-40g-1x8").levels] == ["nvlink"]
  assert [l.name for l in Cluster.preset("cpu-8").levels] == ["host"]


# -------------------------------------------------------------- peak_flops


@pytest.mark.parametrize("name,dtype,expected", [
    ("tpu-v4-32", "float32", 275e12),       # bf16-only: XLA default precision
    ("titanxp-12g-1x8", "bfloat16", 12.1e12),  # no 16-bit units: f32 rate
    ("titanxp-12g-1x8", "float16", 12.1e12),
    ("a100-40g-1x8", "float8_e4m3fn", 312e12),
    ("a100-40g-1x8", "tfloat32", 156e12),
    ("v100-32g-1x8", "tfloat32", 15.7e12),  # no TF32: float32 rate
    ("cpu-8", "bfloat16", 1e11),
])
def test_peak_flops_fallbacks(name, dtype, expected):
  assert Cluster.preset(name).peak_flops(dtype) == pytest.approx(expected)


def test_peak_flops_accepts_dtype_objects():
  c = Cluster.preset("a100-40g-1x8")
  assert c.peak_flops(jnp.bfloat16) == c.peak_flops("bfloat16")
  assert c.peak_flops(np.float32) == c.peak_flops("float32")
  assert c.peak_flops(np.dtype("float16")) == c.peak_flops("float16")


def test_peak_flops_errors():
  c = Cluster.preset("a100-40g-1x8")
  with pytest.raises(ValueError, match=r"lists no peak for float64.*"
                     r"Add peak_flops_per_s\['float64'\]"):
    c.peak_flops("float64")
  with pytest.raises(ValueError, match=r"Unknown dtype 'float13'; known: "
                     "bfloat16, float16"):
    c.peak_flops("float13")


# ----------------------------------------------------------------- immutability


def test_cluster_is_immutable_and_hashable():
  c = Cluster.preset("a100-40g-2x8")
  with pytest.raises(dataclasses.FrozenInstanceError):
    c.memory_bytes = 1  # type: ignore[misc]
  with pytest.raises(TypeError):
    c.peak_flops_per_s["bfloat16"] = 1.0  # type: ignore[index]
  assert isinstance(c.levels, tuple)
  assert {c: 1}[Cluster.preset("a100-40g-2x8")] == 1
  assert c.peak_flops_per_s == {"bfloat16": 312e12, "float16": 312e12,
                                "tfloat32": 156e12, "float32": 19.5e12}


def test_constructor_normalises_inputs():
  level = Level(name="nvlink", size=2, bandwidth_bytes_per_s=300e9,
                latency_s=5e-6)
  c = Cluster(name="x", device_kind="k", num_nodes=1, devices_per_node=2,
              peak_flops_per_s=[("float32", 10)], memory_bytes=2.0e9,
              memory_bandwidth_bytes_per_s=1e12, levels=[level])
  assert c.levels == (level,)
  assert c.memory_bytes == 2 * GB and isinstance(c.memory_bytes, int)
  assert c.peak_flops_per_s == {"float32": 10.0}
  assert c.compute_efficiency == cluster_lib.DEFAULT_COMPUTE_EFFICIENCY


def test_module_import_does_not_import_jax():
  path = pathlib.Path(cluster_lib.__file__)
  code = ("import importlib.util, sys\n"
          f"spec = importlib.util.spec_from_file_location('c', {str(path)!r})\n"
          "m = sys.modules['c'] = importlib.util.module_from_spec(spec)\n"
          "spec.loader.exec_module(m)\n"
          "assert m.Cluster.preset('cpu-8').num_devices == 8\n"
          "assert 'jax' not in sys.modules, 'jax imported'\n")
  subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ bad input


def test_unknown_preset_suggests_and_lists():
  with pytest.raises(ValueError) as e:
    Cluster.preset("a100-40g-2x9")
  msg = str(e.value)
  assert msg.startswith("Unknown cluster preset 'a100-40g-2x9'. Did you mean "
                        "'a100-40g-2x8'? Known presets: a100-40g-1x8, ")
  assert all(n in msg for n in REQUIRED_PRESETS)
  assert "Cluster.from_json(path)" in msg


def test_unknown_preset_without_close_match():
  with pytest.raises(ValueError, match=r"^Unknown cluster preset 'zzz'\. "
                     "Known presets:"):
    Cluster.preset("zzz")


def test_bad_figure_in_file_names_file_and_field(tmp_path):
  data = _json_dict()
  data["levels"][1]["bandwidth_bytes_per_s"] = "25e9"
  path = tmp_path / "cluster.json"
  path.write_text(json.dumps(data))
  with pytest.raises(ValueError) as e:
    Cluster.from_json(path)
  assert str(e.value) == (
      f"{path}: levels[1].bandwidth_bytes_per_s must be a positive number, "
      "got '25e9' (str).")


def _edit(path, value):
  data = _json_dict()
  target = data
  for key in path[:-1]:
    target = target[key]
  target[path[-1]] = value
  return data


@pytest.mark.parametrize("path,value,expected", [
    (("memory_bytes",), -1,
     "cluster JSON: memory_bytes must be a positive integer, got -1 (int)."),
    (("memory_bytes",), True,
     "cluster JSON: memory_bytes must be a positive integer, got True (bool)."),
    (("memory_bytes",), 1.5,
     "cluster JSON: memory_bytes must be a positive integer, got 1.5 (float)."),
    (("memory_bandwidth_bytes_per_s",), 0,
     "cluster JSON: memory_bandwidth_bytes_per_s must be a positive number, "
     "got 0 (int)."),
    (("levels", 0, "latency_s"), -1e-6,
     "cluster JSON: levels[0].latency_s must be a non-negative number, "
     "got -1e-06 (float)."),
    (("levels", 0, "size"), False,
     "cluster JSON: levels[0].size must be a positive integer, got False "
     "(bool)."),
    (("levels", 0, "torus"), 1,
     "cluster JSON: levels[0].torus must be true or false, got 1 (int)."),
    (("peak_flops_per_s", "bfloat16"), "312e12",
     "cluster JSON: peak_flops_per_s['bfloat16'] must be a positive number, "
     "got '312e12' (str)."),
    (("compute_efficiency",), 1.5,
     "cluster JSON: compute_efficiency must be a number in (0, 1], got 1.5 "
     "(float)."),
    (("name",), "",
     "cluster JSON: name must be a non-empty string, got '' (str)."),
    (("schema_version",), 2,
     "cluster JSON: schema_version must be 1 (the version this uniap_jax "
     "reads), got 2 (int)."),
    (("levels",), {"nvlink": 8},
     "cluster JSON: levels must be a list of level objects, got {'nvlink': 8} "
     "(dict)."),
])
def test_bad_field_values(path, value, expected):
  with pytest.raises(ValueError) as e:
    _from(_edit(path, value))
  assert str(e.value) == expected


def test_non_finite_figure():
  data = _json_dict()
  data["memory_bandwidth_bytes_per_s"] = float("inf")
  with pytest.raises(ValueError, match=r"memory_bandwidth_bytes_per_s must be "
                     r"a positive number, got inf \(float\)"):
    Cluster.from_json(json.dumps(data))


def test_missing_fields():
  data = _json_dict()
  del data["memory_bytes"], data["schema_version"]
  with pytest.raises(ValueError, match=re.escape(
      "cluster JSON is missing field(s) 'schema_version', 'memory_bytes'; see "
      "docs/cluster_schema.md.")):
    _from(data)
  data = _json_dict()
  del data["levels"][1]["latency_s"]
  with pytest.raises(ValueError, match=re.escape(
      "cluster JSON: levels[1] is missing field(s) 'latency_s'")):
    _from(data)


def test_optional_fields_take_defaults():
  data = _json_dict()
  del data["compute_efficiency"], data["notes"], data["levels"][0]["torus"]
  c = _from(data)
  assert c.compute_efficiency == cluster_lib.DEFAULT_COMPUTE_EFFICIENCY
  assert c.notes == "" and c.levels[0].torus is False


def test_unknown_fields_are_rejected_by_name():
  data = _json_dict()
  data["gpus"] = 16
  data["interconnect"] = "ib"
  with pytest.raises(ValueError, match=re.escape(
      "cluster JSON has unknown field(s) 'gpus', 'interconnect'; allowed: "
      "schema_version, name, device_kind")):
    _from(data)
  data = _json_dict()
  data["levels"][0]["bw"] = 1
  with pytest.raises(ValueError, match=re.escape(
      "cluster JSON: levels[0] has unknown field(s) 'bw'; allowed: name, size, "
      "bandwidth_bytes_per_s, latency_s, torus.")):
    _from(data)
  data = _json_dict()
  data["peak_flops_per_s"]["fp32"] = 1e12
  with pytest.raises(ValueError, match=re.escape(
      "cluster JSON: peak_flops_per_s has unknown dtype(s) 'fp32'; allowed: "
      "bfloat16, float16, float32")):
    _from(data)


def test_devices_per_node_must_divide():
  data = _json_dict()  # nvlink 8 x infiniband 2
  data["devices_per_node"] = 3
  with pytest.raises(ValueError, match=re.escape(
      "cluster JSON: devices_per_node=3 does not divide the 16 devices the "
      "levels describe (nvlink 8 x infiniband 2). Use devices_per_node in "
      "1, 2, 4, 8, 16, or change the level sizes.")):
    _from(data)


def test_level_sizes_must_match_nodes():
  data = _json_dict()
  data["num_nodes"] = 3
  with pytest.raises(ValueError, match=re.escape(
      "cluster JSON: num_nodes=3 x devices_per_node=8 = 24 devices, but the "
      "levels describe 16 (nvlink 8 x infiniband 2). Use num_nodes=2")):
    _from(data)


def test_level_names_unique_and_levels_present():
  data = _json_dict()
  data["levels"][1]["name"] = "nvlink"
  with pytest.raises(ValueError, match="level names must be unique; repeated: "
                     "'nvlink'"):
    _from(data)
  data["levels"] = []
  with pytest.raises(ValueError, match="levels must list at least one Level"):
    _from(data)


def test_invalid_json_text_and_missing_file(tmp_path):
  with pytest.raises(ValueError, match=r"^cluster JSON: not valid JSON: "):
    Cluster.from_json("{not json")
  with pytest.raises(ValueError,
                     match=r"^Cannot read cluster JSON .*nope\.json"):
    Cluster.from_json(tmp_path / "nope.json")
  with pytest.raises(ValueError, match=re.escape(
      "cluster JSON must be a JSON object, got [1, 2] (list).")):
    _from([1, 2])


def test_direct_construction_errors():
  with pytest.raises(ValueError, match=re.escape(
      "Level.bandwidth_bytes_per_s must be a positive number, got '25e9' "
      "(str).")):
    Level(name="ib", size=2, bandwidth_bytes_per_s="25e9", latency_s=2e-5)
  good = Cluster.preset("a100-40g-2x8")
  with pytest.raises(ValueError, match=re.escape(
      "Cluster.memory_bytes must be a positive integer, got -5 (int).")):
    dataclasses.replace(good, memory_bytes=-5)
  with pytest.raises(ValueError, match=r"^Cluster: num_nodes=4 x "):
    dataclasses.replace(good, num_nodes=4)
  with pytest.raises(ValueError, match="Cluster.levels must be a sequence of "
                     "Level objects"):
    dataclasses.replace(good, levels=({"name": "nvlink"},))


# ---------------------------------------------------------------- calibration


def test_with_calibration_replaces_figures():
  c = Cluster.preset("a100-40g-2x8")
  cal = c.with_calibration(
      compute_efficiency=0.45, memory_bandwidth_bytes_per_s=1.3e12,
      levels={"infiniband": {"bandwidth_bytes_per_s": 20e9, "latency_s": 3e-5}})
  assert cal.compute_efficiency == 0.45
  assert cal.memory_bandwidth_bytes_per_s == 1.3e12
  assert cal.levels[0] == c.levels[0]
  assert (cal.levels[1].bandwidth_bytes_per_s, cal.levels[1].latency_s) == (
      20e9, 3e-5)
  assert c.compute_efficiency == cluster_lib.DEFAULT_COMPUTE_EFFICIENCY
  assert Cluster.from_json(cal.to_json()) == cal


def test_with_calibration_errors():
  c = Cluster.preset("a100-40g-2x8")
  with pytest.raises(ValueError, match=re.escape(
      "with_calibration: unknown level(s) 'ici-x'; 'a100-40g-2x8' has levels "
      "nvlink, infiniband.")):
    c.with_calibration(levels={"ici-x": {"latency_s": 1e-6}})
  with pytest.raises(ValueError, match="unknown figure\\(s\\) 'size'"):
    c.with_calibration(levels={"nvlink": {"size": 4}})
  with pytest.raises(ValueError, match=r"compute_efficiency must be a number "
                     r"in \(0, 1\], got 0 \(int\)"):
    c.with_calibration(compute_efficiency=0)


# ---------------------------------------------------------------- from_devices


def _same_figures(a, b):
  return dataclasses.replace(a, notes="") == dataclasses.replace(b, notes="")


def test_from_devices_on_the_test_cpus():
  assert len(jax.devices()) == 8
  with pytest.warns(UserWarning, match="could not know every figure"):
    c = Cluster.from_devices()
  assert c.device_kind == "cpu" and c.num_devices == 8 and c.num_nodes == 1
  assert _same_figures(c, Cluster.preset("cpu-8"))
  assert "guessed" in c.notes
  assert c.platform == jax.devices()[0].platform == "cpu"


@pytest.mark.parametrize("name,platform", [
    ("cpu-8", "cpu"), ("a100-40g-2x8", "gpu"), ("h100-80g-1x8", "gpu"),
    ("titanxp-12g-1x8", "gpu"), ("tpu-v4-32", "tpu"), ("tpu-v5e-256", "tpu")])
def test_platform_names_the_xla_backend(name, platform):
  """The backend decides what XLA's fusions keep in memory (the cost model asks)."""
  c = Cluster.preset(name)
  assert c.platform == platform
  assert dataclasses.replace(c, device_kind=" CPU ").platform == "cpu"
  assert dataclasses.replace(c, device_kind="My Accelerator").platform == "gpu"


def test_from_devices_gpu_matches_preset_and_warns():
  devices = [FakeDevice("NVIDIA A100-SXM4-40GB", process_index=i // 8)
             for i in range(16)]
  with pytest.warns(UserWarning) as record:
    c = Cluster.from_devices(devices)
  msg = str(record[0].message)
  for guessed in ("nvlink bandwidth", "infiniband bandwidth",
                  "compute_efficiency"):
    assert guessed in msg
  assert _same_figures(c, Cluster.preset("a100-40g-2x8"))


def test_from_devices_one_process_per_gpu():
  devices = [FakeDevice("NVIDIA H100 80GB HBM3", process_index=i)
             for i in range(16)]
  with pytest.warns(UserWarning):
    c = Cluster.from_devices(devices, devices_per_node=8)
  assert (c.name, c.num_nodes, c.devices_per_node) == ("h100-80g-2x8", 2, 8)
  assert c.peak_flops("bfloat16") == 989e12


@pytest.mark.parametrize("kind,key", [
    ("NVIDIA A100-SXM4-80GB", "a100-80g"),
    ("NVIDIA A100-PCIE-40GB", "a100-40g"),
    ("Tesla V100-SXM2-32GB", "v100-32g"),
    ("Tesla V100-SXM2-16GB", "v100-16g"),
    ("NVIDIA GeForce RTX 3090", "rtx3090-24g"),
    ("NVIDIA TITAN Xp", "titanxp-12g"),
    ("TPU v4", "tpu-v4"),
    ("TPU v5 lite", "tpu-v5e"),
    ("TPU v5e", "tpu-v5e"),
    ("TPU v5p", "tpu-v5p"),
    ("TPU v5", "tpu-v5p"),
])
def test_from_devices_recognises_kinds(kind, key):
  with pytest.warns(UserWarning):
    c = Cluster.from_devices([FakeDevice(kind)] * 4)
  assert c.name.startswith(key + "-")
  assert c.device_kind == kind


def test_from_devices_pcie_a100_uses_pcie():
  with pytest.warns(UserWarning, match="pcie bandwidth"):
    c = Cluster.from_devices([FakeDevice("NVIDIA A100-PCIE-40GB")] * 4)
  assert c.levels[0].name == "pcie"


def test_from_devices_tpu_coords_give_torus_dims():
  devices = [FakeTpu("TPU v5p", process_index=i // 4,
                     coords=(i % 4, i // 4 % 4, i // 16)) for i in range(64)]
  with pytest.warns(UserWarning, match="wraps around"):
    c = Cluster.from_devices(devices)
  assert _same_figures(c, Cluster.preset("tpu-v5p-128"))


def test_from_devices_two_tpu_slices_add_a_dcn_level():
  devices = [FakeTpu("TPU v5 lite", process_index=i // 4,
                     coords=(i % 4, i // 4 % 4, 0), slice_index=i // 16)
             for i in range(32)]
  with pytest.warns(UserWarning, match="DCN bandwidth"):
    c = Cluster.from_devices(devices)
  assert [(l.name, l.size, l.torus) for l in c.levels] == [
      ("ici-x", 4, False), ("ici-y", 4, False), ("dcn", 2, False)]
  assert (c.name, c.num_nodes, c.devices_per_node) == ("tpu-v5e-32", 8, 4)
  assert c.levels[-1].latency_s > c.levels[0].latency_s


def test_from_devices_tpu_without_coords_is_one_ring():
  devices = [FakeDevice("TPU v4", process_index=i // 4, platform="tpu")
             for i in range(8)]
  with pytest.warns(UserWarning, match="the ICI shape"):
    c = Cluster.from_devices(devices)
  assert [(l.name, l.size) for l in c.levels] == [("ici", 8)]
  assert (c.name, c.num_nodes) == ("tpu-v4-16", 2)


def test_from_devices_unknown_kind():
  with pytest.raises(ValueError) as e:
    Cluster.from_devices([FakeDevice("Acme Tensor 9000")] * 2)
  msg = str(e.value)
  assert msg.startswith("Unknown device kind 'Acme Tensor 9000'; known kinds: ")
  for kind in ("NVIDIA A100-SXM4-40GB", "NVIDIA H100 80GB HBM3", "TPU v5p",
               "TPU v5 lite", "NVIDIA TITAN Xp", "cpu"):
    assert kind in msg
  assert "Cluster.from_json(path)" in msg


def test_from_devices_other_errors():
  with pytest.raises(ValueError, match="mixed device kinds"):
    Cluster.from_devices([FakeDevice("TPU v4"), FakeDevice("cpu")])
  with pytest.raises(ValueError, match=re.escape(
      "processes hold different numbers of devices ({0: 3, 1: 1})")):
    Cluster.from_devices([FakeDevice("cpu", i // 3) for i in range(4)])
  with pytest.raises(ValueError, match="devices_per_node=3 does not divide "
                     "the 8 devices. Use one of 1, 2, 4, 8."):
    Cluster.from_devices([FakeDevice("cpu")] * 8, devices_per_node=3)
  with pytest.raises(ValueError, match="no devices given"):
    Cluster.from_devices([])


def test_from_devices_cpu_processes_get_a_slower_level_between_them():
  devices = [FakeDevice("cpu", process_index=i // 4, platform="cpu") for i in range(8)]
  with pytest.warns(UserWarning, match="guessed|could not know"):
    c = Cluster.from_devices(devices)
  assert (c.num_nodes, c.devices_per_node) == (2, 4)
  assert [(l.name, l.size) for l in c.levels] == [("host", 4), ("network", 2)]
  assert c.levels[1].bandwidth_bytes_per_s < c.levels[0].bandwidth_bytes_per_s
  assert c.levels[1].latency_s > c.levels[0].latency_s
