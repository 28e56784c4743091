"""Tests of the model zoo: parameter counts, training, shape-only tracing, errors."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import models
from experiments.models import llama
from experiments.models import swin
from experiments.models import t5

# Loss after 20 AdamW steps on one fixed batch must be at most this fraction of the first.
MAX_LOSS_RATIO_AFTER_20_STEPS = 0.9
TINY_LEARNING_RATE = 1e-3
TINY_BATCH_SIZE = 4


@functools.cache
def _paper_model(name):
  """Each paper-size model is built shape-only once per test session."""
  return models.create(name, "paper", shape_only=True)


@functools.cache
def _cached_tiny_model(name):
  return models.create(name, "tiny")


def _tiny_model(name):
  """A fresh copy of the tiny model (built once per session: eager init is the slow part)."""
  return nnx.clone(_cached_tiny_model(name))


def _leaves(tree):
  return jax.tree.leaves(tree)


# --- the tables --------------------------------------------------------------------------


def test_names_match_published_table():
  assert set(models.NAMES) == set(models.PUBLISHED_PARAMS)
  assert set(models.NAMES) == {"bert_huge", "t5_large", "vit_huge", "swin_huge", "llama_7b",
                               "gpt2", "llama_70b"}
  for name in models.NAMES:
    assert dataclasses.is_dataclass(models.config(name, "paper"))
    assert dataclasses.is_dataclass(models.config(name, "tiny"))


# --- parameter counts, shape-only ---------------------------------------------------------


@pytest.mark.parametrize("name", models.NAMES)
def test_paper_param_count_matches_published(name):
  model = _paper_model(name)
  assert models.is_abstract(model)
  assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in _leaves(nnx.state(model)))
  count = models.count_params(model)
  published = models.PUBLISHED_PARAMS[name]
  assert abs(count - published) <= models.PARAM_TOLERANCE * published, (name, count, published)


def _llama_closed_form(c: llama.Config) -> int:
  kv = c.num_kv_heads * c.head_dim
  block = 2 * c.dim * c.dim + 2 * c.dim * kv + 3 * c.dim * c.ffn_dim + 2 * c.dim
  return 2 * c.vocab_size * c.dim + c.num_layers * block + c.dim


@pytest.mark.parametrize("name", ["llama_7b", "llama_70b"])
@pytest.mark.parametrize("size", models.SIZES)
def test_llama_param_count_closed_form(name, size):
  model = _paper_model(name) if size == "paper" else models.create(name, size, shape_only=True)
  assert models.count_params(model) == _llama_closed_form(models.config(name, size))


def test_known_exact_counts():
  # GPT-2 small and Llama-7B as counted from their released checkpoints.
  assert models.count_params(_paper_model("gpt2")) == 124_439_808
  assert models.count_params(_paper_model("llama_7b")) == 6_738_415_616


def test_shape_only_respects_dtype():
  model = models.create("gpt2", "tiny", shape_only=True, dtype=jnp.bfloat16)
  assert {leaf.dtype for leaf in _leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("bfloat16")}


def test_tied_heads_have_no_weights_of_their_own():
  for name in ("gpt2", "t5_large"):
    model = models.create(name, "tiny", shape_only=True)
    assert not _leaves(nnx.state(model.lm_head, nnx.Param))
  bert = models.create("bert_huge", "tiny", shape_only=True)
  # The MLM head owns its transform, norm and output bias, not a vocab x dim matrix.
  shapes = [leaf.shape for leaf in _leaves(nnx.state(bert.mlm_head, nnx.Param))]
  assert (models.config("bert_huge", "tiny").vocab_size, 64) not in shapes


# --- structure: one top-level module call per block ---------------------------------------


def _top_level_calls(model, batch, loss, monkeypatch):
  """Records, in order, the model's direct children called outside any other child."""
  names = {}
  for attr, value in vars(model).items():
    if isinstance(value, nnx.List):
      names.update({id(m): f"{attr}/{i}" for i, m in enumerate(value)})
    elif isinstance(value, nnx.Module):
      names[id(value)] = attr
  calls, depth = [], [0]
  classes = {type(node) for _, node in nnx.iter_graph(model)
             if isinstance(node, nnx.Module) and node is not model}

  def wrap(original):
    def call(self, *args, **kwargs):
      if depth[0] == 0:
        calls.append(names.get(id(self), f"<not a direct child: {type(self).__name__}>"))
      depth[0] += 1
      try:
        return original(self, *args, **kwargs)
      finally:
        depth[0] -= 1
    return call

  for cls in classes:
    monkeypatch.setattr(cls, "__call__", wrap(cls.__call__))
  # Trace (no execution) with the model closed over, so module identities are kept.
  jax.make_jaxpr(lambda b: loss(model, b))(batch)
  return tuple(calls)


@pytest.mark.parametrize("name", models.NAMES)
def test_layer_names_are_the_top_level_calls(name, monkeypatch):
  model = _tiny_model(name)
  batch = models.example_batch(name, "tiny", 2)
  calls = _top_level_calls(model, batch, models.loss_fn(name), monkeypatch)
  assert calls == model.layer_names()
  num_blocks = sum(1 for c in calls if "blocks/" in c or "layers/" in c)
  assert num_blocks >= 2
  # Every parameter lives in a module that is called at the top level.
  called = {c.split("/")[0] for c in calls}
  param_roots = {path[0] for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert param_roots <= called


def test_swin_layers_interleave_blocks_and_merges():
  model = _paper_model("swin_huge")
  kinds = ["merge" if isinstance(m, swin.PatchMerging) else "block" for m in model.layers]
  merges = [i for i, k in enumerate(kinds) if k == "merge"]
  assert merges == [2, 5, 48]  # after 2, 2 and 42 blocks
  assert len(kinds) == 2 + 2 + 42 + 2 + 3
  shifts = [m.shift for m in model.layers if isinstance(m, swin.Block)]
  assert shifts[:4] == [0, 3, 0, 3] and shifts[-2:] == [0, 0]  # last stage: 7x7 = one window


# --- training ------------------------------------------------------------------------------


# XLA's cheaper CPU pipeline: compiling the tiny steps dominates this file's run time.
FAST_COMPILE = {"xla_llvm_disable_expensive_passes": True}


def _jit_step(name, model, optimizer, batch):
  """train_step(name) jitted over the split (model, optimizer) state, as a pure function."""
  graphdef, state = nnx.split((model, optimizer))
  step = models.train_step(name)

  def pure(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    loss = step(model, optimizer, batch)
    return loss, nnx.state((model, optimizer))

  compiled = jax.jit(pure).lower(state, batch).compile(compiler_options=FAST_COMPILE)
  return compiled, state


@pytest.mark.parametrize("name", models.NAMES)
def test_tiny_model_trains(name):
  model = _tiny_model(name)
  optimizer = models.create_optimizer(model, learning_rate=TINY_LEARNING_RATE)
  batch = models.example_batch(name, "tiny", TINY_BATCH_SIZE)
  step, state = _jit_step(name, model, optimizer, batch)
  losses = []
  for _ in range(20):
    loss, state = step(state, batch)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses)), losses
  assert losses[-1] <= MAX_LOSS_RATIO_AFTER_20_STEPS * losses[0], losses


def test_train_step_is_one_function_per_family():
  assert models.train_step("llama_7b") is models.train_step("llama_7b")
  assert models.train_step("llama_7b") is models.train_step("llama_70b")
  assert models.train_step("gpt2") is not models.train_step("llama_7b")


# --- shape-only tracing, as the planner does it --------------------------------------------


def _trace(name, model, batch_size=2):
  optimizer = models.create_optimizer(model)
  size = "paper" if model is _paper_model(name) else "tiny"
  batch = models.example_batch(name, size, batch_size, shape_only=True)
  return jax.make_jaxpr(models.train_step(name))(model, optimizer, batch), optimizer


@pytest.mark.parametrize("name", models.NAMES)
def test_tiny_train_step_traces_shape_only(name):
  model = models.create(name, "tiny", shape_only=True)
  jaxpr, optimizer = _trace(name, model)
  assert [v.aval.shape for v in jaxpr.jaxpr.outvars] == [()]
  # The optimizer is abstract too: a step count plus two AdamW moments per parameter.
  opt_leaves = _leaves(nnx.state(optimizer))
  assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in opt_leaves)
  num_params = len(_leaves(nnx.state(model, nnx.Param)))
  assert len(opt_leaves) == 2 * num_params + 2  # mu, nu, adam count, optimizer step


@pytest.mark.parametrize(
    "name",
    ["llama_7b"]
    + [pytest.param(n, marks=pytest.mark.slow)
       for n in ("bert_huge", "t5_large", "vit_huge", "swin_huge", "gpt2", "llama_70b")])
def test_paper_train_step_traces_shape_only(name):
  model = _paper_model(name)
  jaxpr, _ = _trace(name, model)
  assert [v.aval.shape for v in jaxpr.jaxpr.outvars] == [()]
  # Every parameter of the model is an input of the traced step.
  in_shapes = [tuple(v.aval.shape) for v in jaxpr.jaxpr.invars]
  for leaf in _leaves(nnx.state(model, nnx.Param)):
    assert tuple(leaf.shape) in in_shapes
  assert models.is_abstract(model)  # tracing did not make the model concrete


# --- batches ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", models.NAMES)
def test_example_batch_shapes_and_determinism(name):
  spec = models.example_batch(name, "tiny", 3, shape_only=True)
  batch = models.example_batch(name, "tiny", 3)
  assert set(spec) == set(batch)
  for key in spec:
    assert isinstance(spec[key], jax.ShapeDtypeStruct)
    assert (batch[key].shape, batch[key].dtype) == (spec[key].shape, spec[key].dtype), key
    assert batch[key].shape[0] == 3
  again = models.example_batch(name, "tiny", 3)
  other = models.example_batch(name, "tiny", 3, seed=1)
  assert all(np.array_equal(batch[k], again[k]) for k in batch)
  assert not all(np.array_equal(batch[k], other[k]) for k in batch)


@pytest.mark.parametrize("name,key,shape", [
    ("bert_huge", "input_ids", (8, 512)),
    ("t5_large", "decoder_input_ids", (8, 512)),
    ("gpt2", "input_ids", (8, 1024)),
    ("llama_7b", "input_ids", (8, 2048)),
    ("llama_70b", "labels", (8, 4096)),
    ("vit_huge", "images", (8, 224, 224, 3)),
    ("swin_huge", "images", (8, 224, 224, 3)),
])
def test_paper_batch_lengths(name, key, shape):
  assert models.example_batch(name, "paper", 8, shape_only=True)[key].shape == shape


def test_seq_len_override():
  batch = models.example_batch("t5_large", "tiny", 2, seq_len=8)
  assert batch["input_ids"].shape == batch["labels"].shape == (2, 8)
  # Teacher forcing: the decoder sees the labels shifted right behind the start token.
  np.testing.assert_array_equal(batch["decoder_input_ids"][:, 1:], batch["labels"][:, :-1])
  assert np.all(batch["decoder_input_ids"][:, 0] == t5.DECODER_START_ID)


def test_lm_labels_are_next_tokens():
  batch = models.example_batch("llama_7b", "tiny", 2)
  np.testing.assert_array_equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])


def test_bert_batch_masks_tokens():
  batch = models.example_batch("bert_huge", "tiny", 4, seq_len=64)
  masked = np.asarray(batch["label_weights"]) > 0
  mask_id = models.config("bert_huge", "tiny").mask_token_id
  assert np.all(np.asarray(batch["input_ids"])[masked] == mask_id)
  assert np.all(masked.any(axis=1))
  kept = ~masked
  np.testing.assert_array_equal(np.asarray(batch["input_ids"])[kept],
                                np.asarray(batch["labels"])[kept])


# --- model behaviour ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama_7b", "llama_70b", "gpt2"])
def test_decoders_are_causal(name):
  model = _tiny_model(name)
  ids = models.example_batch(name, "tiny", 1)["input_ids"]
  changed = ids.at[0, 10].set((ids[0, 10] + 1) % models.config(name, "tiny").vocab_size)
  forward = nnx.jit(lambda m, x: m(x))
  before, after = forward(model, ids), forward(model, changed)
  np.testing.assert_allclose(before[0, :10], after[0, :10], rtol=1e-5, atol=1e-5)
  assert not np.allclose(before[0, 10:], after[0, 10:])


def test_t5_decoder_is_causal_and_sees_the_encoder():
  model = _tiny_model("t5_large")
  batch = models.example_batch("t5_large", "tiny", 1)
  enc, dec = batch["input_ids"], batch["decoder_input_ids"]
  forward = nnx.jit(lambda m, e, d: m(e, d))
  base = forward(model, enc, dec)
  later = forward(model, enc, dec.at[0, 10].set(dec[0, 10] + 1))
  np.testing.assert_allclose(base[0, :10], later[0, :10], rtol=1e-5, atol=1e-5)
  other_input = forward(model, enc.at[0, 15].set(enc[0, 15] + 1), dec)
  assert not np.allclose(base[0, 0], other_input[0, 0])  # cross-attention reaches position 0


def test_t5_relative_buckets_known_values():
  buckets = functools.partial(t5.relative_buckets, num_buckets=32, max_distance=128)
  both = buckets(1, 400, bidirectional=True)[0]  # key position minus query position = index
  assert (both[0], both[1], both[7], both[8]) == (0, 17, 23, 24)  # 16 + log-spaced from 8
  assert both[399] == 31  # beyond max_distance: the last bucket
  causal = buckets(400, 1, bidirectional=False)[:, 0]  # query i, key 0: distance i
  assert (causal[0], causal[15], causal[16], causal[20], causal[399]) == (0, 15, 16, 17, 31)
  assert buckets(1, 3, bidirectional=False)[0].tolist() == [0, 0, 0]  # future keys: bucket 0


def test_swin_shift_mask_separates_wrapped_regions():
  mask = swin.shift_mask(8, 4, 2)  # 8x8 tokens, four 4x4 windows, shift 2
  assert mask.shape == (4, 16, 16)
  assert np.all(mask[0] == 0)  # the top-left window holds one contiguous region
  assert np.any(mask[-1] < 0) and np.any(mask[-1] == 0)  # wrapped-around regions split
  assert np.all(np.diagonal(mask, axis1=1, axis2=2) == 0)  # a token always sees itself
  np.testing.assert_array_equal(mask, np.swapaxes(mask, 1, 2))


def test_swin_relative_position_index():
  index = swin.relative_position_index(2)
  # 2x2 window: token 0 at (0,0), token 3 at (1,1); offsets (dy+1)*3 + (dx+1).
  assert index[0, 0] == 4 and index[0, 3] == 0 and index[3, 0] == 8
  assert index.max() == (2 * 2 - 1) ** 2 - 1


# --- bad input ---------------------------------------------------------------------------


def test_unknown_model_name_suggests_and_lists():
  for call in (lambda: models.create("llama7b"), lambda: models.example_batch("llama7b", "tiny", 1),
               lambda: models.train_step("llama7b")):
    with pytest.raises(ValueError, match=r"Unknown model 'llama7b'\. Did you mean 'llama_7b'\?"
                       r" Known models: bert_huge, .*llama_70b"):
      call()


def test_unknown_size():
  with pytest.raises(ValueError, match="Unknown size 'small'.*paper, tiny"):
    models.create("gpt2", "small")


@pytest.mark.parametrize("name,seq_len,limit", [
    ("bert_huge", 513, "max_positions=512"),
    ("gpt2", 1025, "max_positions=1024"),
    ("llama_7b", 2049, "max_seq_len=2048"),
])
def test_example_batch_rejects_too_long_sequences(name, seq_len, limit):
  with pytest.raises(ValueError, match=f"seq_len={seq_len} is longer.*{limit}"):
    models.example_batch(name, "paper", 1, seq_len=seq_len, shape_only=True)


def test_example_batch_rejects_bad_arguments():
  with pytest.raises(ValueError, match="vit_huge takes 224x224 images, not sequences"):
    models.example_batch("vit_huge", "paper", 1, seq_len=16)
  with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
    models.example_batch("gpt2", "tiny", 0)


def test_model_call_rejects_too_long_sequence():
  model = _tiny_model("gpt2")
  ids = jnp.zeros((1, models.config("gpt2", "tiny").max_positions + 1), jnp.int32)
  with pytest.raises(ValueError, match="input_ids has sequence length 65.*max_positions=64"):
    model(ids)
  with pytest.raises(TypeError, match="integer token ids"):
    model(jnp.zeros((1, 4), jnp.float32))


@pytest.mark.parametrize("name", ["vit_huge", "swin_huge"])
def test_model_call_rejects_wrong_image_size(name):
  model = _tiny_model(name)
  with pytest.raises(ValueError, match="images have height 48, the model expects 32"):
    model(jnp.zeros((1, 48, 32, 3)))
  with pytest.raises(ValueError, match="images have channels 1, the model expects 3"):
    model(jnp.zeros((1, 32, 32, 1)))


def test_config_rejects_image_not_divisible_by_patch():
  with pytest.raises(ValueError, match=r"image_size=30 is not divisible by patch_size=4"):
    dataclasses.replace(models.config("vit_huge", "tiny"), image_size=30)
  with pytest.raises(ValueError, match="stage 0 resolution=6 is not divisible by stage 0 window=4"):
    dataclasses.replace(models.config("swin_huge", "tiny"), image_size=24)


def test_loss_rejects_incomplete_batch():
  model = _tiny_model("llama_7b")
  batch = models.example_batch("llama_7b", "tiny", 1)
  del batch["labels"]
  with pytest.raises(ValueError, match=r"lacks \['labels'\]"):
    models.loss_fn("llama_7b")(model, batch)


# --- the command line ----------------------------------------------------------------------


def test_table_lists_counts_and_layers():
  text = models.param_table(["gpt2", "llama_7b"], "paper")
  lines = text.splitlines()
  assert lines[0].split() == ["model", "parameters", "published", "difference", "layers"]
  gpt2_row = next(line for line in lines if line.startswith("gpt2")).split()
  assert gpt2_row == ["gpt2", "124,439,808", "124,400,000", "+0.032%", "15"]  # 1 + 12 + 2
  llama_row = next(line for line in lines if line.startswith("llama_7b")).split()
  assert llama_row[1] == "6,738,415,616" and llama_row[-1] == "35"  # 1 + 32 + 2
