"""ViT checkpoints (big_vision / vit_jax .npz, timm and HF safetensors) -> AnatomyViT encoder."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
from scipy.special import erf

from avlm_jax.convert import tree, vit
from avlm_jax.models.anatomy_vit import AnatomyViT

SMALL = dict(patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=64, embed_dim=16)
REGIONS = 29
CREATED_PREFIXES = ("anatomy_tokens", "box_head/", "presence_head/", "region_projection/", "image_projection/")


def _init(size: int, channels: int = 1, seed: int = 0, **overrides):
  model = AnatomyViT(**{**SMALL, **overrides})
  params = model.init(jax.random.key(seed), jnp.zeros((1, size, size, channels)))["params"]
  return model, params


def _flat(params):
  return {k: np.asarray(v) for k, v in tree.flat(nn.unbox(params)).items()}


def _apply(model, params, images):
  out = jax.jit(lambda p, x: model.apply({"params": p}, x))(nn.unbox(params), images)
  return {k: np.asarray(v) for k, v in out.items()}


def _export(params, path, layout):
  if layout == "big_vision":
    vit.export_big_vision_npz(params, path, num_heads=SMALL["num_heads"])
  else:
    vit.export_timm_safetensors(params, path)


# --- round trip through our exporters ------------------------------------------------------------


@pytest.mark.parametrize("layout, name", [("big_vision", "vit.npz"), ("timm", "vit.safetensors")])
def test_round_trip(tmp_path, layout, name):
  model, source = _init(32, seed=0)
  _, template = _init(32, seed=1)
  path = str(tmp_path / name)
  _export(source, path, layout)
  loaded, report = vit.load_vit_params(path, template, num_heads=SMALL["num_heads"])

  src, tpl, got = _flat(source), _flat(template), _flat(loaded)
  assert got.keys() == src.keys()
  for key in got:
    if key == "pos_embedding":
      continue
    expected = tpl[key] if key.startswith(CREATED_PREFIXES) else src[key]
    np.testing.assert_array_equal(got[key], expected, err_msg=key)
  # Position rows: CLS and patches from the checkpoint, anatomy rows keep the template's init.
  np.testing.assert_array_equal(got["pos_embedding"][:, :1], src["pos_embedding"][:, :1])
  np.testing.assert_array_equal(got["pos_embedding"][:, 1 + REGIONS:], src["pos_embedding"][:, 1 + REGIONS:])
  anatomy_rows = slice(1, 1 + REGIONS)
  np.testing.assert_array_equal(got["pos_embedding"][:, anatomy_rows], tpl["pos_embedding"][:, anatomy_rows])

  assert report.source.endswith(f"({layout} layout)")
  created = {k for k in tpl if k.startswith(CREATED_PREFIXES)}
  assert set(report.created) == created | {"pos_embedding[anatomy]"}
  loaded_keys = set(tpl) - created - {"pos_embedding"}
  assert set(report.loaded) == loaded_keys | {"pos_embedding[cls]", "pos_embedding[patches]"}
  assert report.skipped == [] and report.notes == []

  # The same model with the template's fresh parts swapped in computes exactly the same outputs.
  hybrid = {k: tpl[k] if k.startswith(CREATED_PREFIXES) else src[k] for k in src}
  hybrid["pos_embedding"] = got["pos_embedding"]
  images = jax.random.normal(jax.random.key(2), (2, 32, 32, 1))
  ours, expected = _apply(model, loaded, images), _apply(model, tree.rebuild(source, hybrid), images)
  for key in expected:
    np.testing.assert_array_equal(ours[key], expected[key], err_msg=key)


def _bilinear(grid: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """Half-pixel-centre bilinear resize of (h, w, D), edges clamped: written out for the test."""
  def taps(n_in, n_out):
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    return lo, np.minimum(lo + 1, n_in - 1), src - lo

  y0, y1, ty = taps(grid.shape[0], out_h)
  x0, x1, tx = taps(grid.shape[1], out_w)
  rows = grid[y0] * (1 - ty)[:, None, None] + grid[y1] * ty[:, None, None]
  return rows[:, x0] * (1 - tx)[None, :, None] + rows[:, x1] * tx[None, :, None]


@pytest.mark.parametrize("layout, name", [("big_vision", "vit.npz"), ("timm", "vit.safetensors")])
def test_smaller_grid_is_resized_bilinearly(tmp_path, layout, name):
  _, source = _init(24, seed=0)  # 3x3 patches
  _, template = _init(48, seed=1)  # 6x6 patches
  path = str(tmp_path / name)
  _export(source, path, layout)
  loaded, report = vit.load_vit_params(path, template)
  src_pos, got_pos = _flat(source)["pos_embedding"][0], _flat(loaded)["pos_embedding"][0]
  expected = _bilinear(src_pos[1 + REGIONS:].reshape(3, 3, -1), 6, 6).reshape(36, -1)
  np.testing.assert_allclose(got_pos[1 + REGIONS:], expected, atol=1e-6, rtol=0)
  np.testing.assert_array_equal(got_pos[0], src_pos[0])
  assert "pos_embedding[patches]: resized 3x3 -> 6x6 bilinear" in report.notes


def test_rgb_kernel_is_summed_to_grayscale(tmp_path):
  rgb_model, rgb_params = _init(32, channels=3, seed=0)
  gray_model, gray_template = _init(32, channels=1, seed=1)
  path = str(tmp_path / "rgb.safetensors")
  vit.export_timm_safetensors(rgb_params, path)
  loaded, report = vit.load_vit_params(path, gray_template)
  rgb_kernel = _flat(rgb_params)["patch_embedding/kernel"]
  summed = rgb_kernel.sum(axis=2, keepdims=True)
  np.testing.assert_allclose(_flat(loaded)["patch_embedding/kernel"], summed, rtol=1e-6)
  assert any("summed the checkpoint's 3 input channels" in n for n in report.notes)
  # What the summation is for: a grayscale image gives what the RGB model gives on it replicated.
  gray = jax.random.uniform(jax.random.key(3), (2, 32, 32, 1))
  anatomy = {k: v for k, v in _flat(rgb_params).items() if k.startswith(CREATED_PREFIXES)}
  anatomy["pos_embedding"] = _flat(loaded)["pos_embedding"]
  rgb_same_heads = tree.rebuild(rgb_params, anatomy)
  loaded_same_heads = tree.rebuild(loaded, anatomy)
  ours = _apply(gray_model, loaded_same_heads, gray)
  reference = _apply(rgb_model, rgb_same_heads, jnp.repeat(gray, 3, axis=-1))
  for key in ("cls_token", "patch_tokens", "boxes"):
    np.testing.assert_allclose(ours[key], reference[key], atol=1e-5, rtol=0, err_msg=key)


# --- independent reference: a plain ViT written in numpy over big_vision-shaped weights ---------


def _random_big_vision(seed=0, channels=3, size=32):
  """Random plain-ViT weights in big_vision shapes, with a CLS row in the position table."""
  rng = np.random.default_rng(seed)
  d, f, h, p = SMALL["width"], SMALL["mlp_dim"], SMALL["num_heads"], SMALL["patch_size"]
  n = (size // p) ** 2
  r = lambda *s, scale=0.2: (scale * rng.standard_normal(s)).astype(np.float32)
  w = {"embedding/kernel": r(p, p, channels, d, scale=0.1), "embedding/bias": r(d), "cls": r(1, 1, d),
       "pos_embedding": r(1, 1 + n, d), "Transformer/encoder_norm/scale": 1 + r(d),
       "Transformer/encoder_norm/bias": r(d)}
  for i in range(SMALL["depth"]):
    b = f"Transformer/encoderblock_{i}/"
    for ln in ("LayerNorm_0", "LayerNorm_1"):
      w[f"{b}{ln}/scale"], w[f"{b}{ln}/bias"] = 1 + r(d), r(d)
    for name in ("query", "key", "value"):
      w[f"{b}MultiHeadDotProductAttention_0/{name}/kernel"] = r(d, h, d // h)
      w[f"{b}MultiHeadDotProductAttention_0/{name}/bias"] = r(h, d // h)
    w[f"{b}MultiHeadDotProductAttention_0/out/kernel"] = r(h, d // h, d)
    w[f"{b}MultiHeadDotProductAttention_0/out/bias"] = r(d)
    w[f"{b}MlpBlock_0/Dense_0/kernel"], w[f"{b}MlpBlock_0/Dense_0/bias"] = r(d, f), r(f)
    w[f"{b}MlpBlock_0/Dense_1/kernel"], w[f"{b}MlpBlock_0/Dense_1/bias"] = r(f, d), r(d)
  return w


def _reference_vit(w, image):
  """Pre-norm ViT (exact GELU, LayerNorm eps 1e-6) in float64: (1 + N, D) final normed tokens."""
  w = {k: v.astype(np.float64) for k, v in w.items()}

  def ln(x, name):
    normed = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    return normed * w[name + "/scale"] + w[name + "/bias"]

  p = w["embedding/kernel"].shape[0]
  hh, ww, c = image.shape
  patches = image.reshape(hh // p, p, ww // p, p, c).transpose(0, 2, 1, 3, 4).reshape(-1, p * p * c)
  x = patches @ w["embedding/kernel"].reshape(p * p * c, -1) + w["embedding/bias"]
  x = np.concatenate([w["cls"][0], x]) + w["pos_embedding"][0]
  for i in range(SMALL["depth"]):
    b = f"Transformer/encoderblock_{i}/"
    a = b + "MultiHeadDotProductAttention_0/"
    y = ln(x, b + "LayerNorm_0")
    q, k, v = (np.einsum("nd,dhk->nhk", y, w[f"{a}{n}/kernel"]) + w[f"{a}{n}/bias"]
               for n in ("query", "key", "value"))
    logits = np.einsum("qhk,nhk->hqn", q, k) / np.sqrt(q.shape[-1])
    att = np.exp(logits - logits.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    x = x + np.einsum("hqn,nhk,hkd->qd", att, v, w[a + "out/kernel"]) + w[a + "out/bias"]
    y = ln(x, b + "LayerNorm_1")
    hidden = y @ w[b + "MlpBlock_0/Dense_0/kernel"] + w[b + "MlpBlock_0/Dense_0/bias"]
    hidden = 0.5 * hidden * (1 + erf(hidden / np.sqrt(2)))
    x = x + hidden @ w[b + "MlpBlock_0/Dense_1/kernel"] + w[b + "MlpBlock_0/Dense_1/bias"]
  return ln(x, "Transformer/encoder_norm")


def _as_vit_jax(w):
  """The original vit_jax naming: numbered sublayers and a posembed_input table with a CLS row."""
  out = {}
  for k, v in w.items():
    k = k.replace("MultiHeadDotProductAttention_0", "MultiHeadDotProductAttention_1")
    k = k.replace("LayerNorm_1", "LayerNorm_2").replace("MlpBlock_0", "MlpBlock_3")
    out["Transformer/posembed_input/pos_embedding" if k == "pos_embedding" else k] = v
  out["head/kernel"], out["head/bias"] = np.zeros((SMALL["width"], 5), np.float32), np.zeros(5, np.float32)
  return out


def _torch_patch(kernel):
  return kernel.transpose(3, 2, 0, 1)  # (p, p, C, D) -> torch Conv2d (D, C, p, p)


def _torch_norm(t, dst, w, src):
  t[dst + ".weight"], t[dst + ".bias"] = w[src + "/scale"], w[src + "/bias"]


def _torch_linear(t, dst, kernel, bias):
  t[dst + ".weight"], t[dst + ".bias"] = kernel.T, bias  # torch Linear weights are (out, in)


def _heads_merged(w, a, name):
  """big_vision (D, H, hd) / (H, hd) q, k or v as a plain (D, D) kernel and (D,) bias."""
  d = SMALL["width"]
  return w[f"{a}{name}/kernel"].reshape(d, d), w[f"{a}{name}/bias"].reshape(d)


def _as_timm(w):
  d = SMALL["width"]
  t = {"patch_embed.proj.weight": _torch_patch(w["embedding/kernel"]),
       "patch_embed.proj.bias": w["embedding/bias"],
       "cls_token": w["cls"], "pos_embed": w["pos_embedding"], "head.weight": np.zeros((5, d), np.float32)}
  _torch_norm(t, "norm", w, "Transformer/encoder_norm")
  for i in range(SMALL["depth"]):
    b, s = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
    a = s + "MultiHeadDotProductAttention_0/"
    _torch_norm(t, b + "norm1", w, s + "LayerNorm_0")
    _torch_norm(t, b + "norm2", w, s + "LayerNorm_1")
    qkv = [_heads_merged(w, a, n) for n in ("query", "key", "value")]
    qkv_kernel = np.concatenate([kernel for kernel, _ in qkv], axis=1)
    _torch_linear(t, b + "attn.qkv", qkv_kernel, np.concatenate([bias for _, bias in qkv]))
    _torch_linear(t, b + "attn.proj", w[a + "out/kernel"].reshape(d, d), w[a + "out/bias"])
    _torch_linear(t, b + "mlp.fc1", w[s + "MlpBlock_0/Dense_0/kernel"], w[s + "MlpBlock_0/Dense_0/bias"])
    _torch_linear(t, b + "mlp.fc2", w[s + "MlpBlock_0/Dense_1/kernel"], w[s + "MlpBlock_0/Dense_1/bias"])
  return {k: np.ascontiguousarray(v) for k, v in t.items()}


def _as_hf(w):
  """ViTForImageClassification naming: the encoder under 'vit.', a classifier beside it."""
  d, e = SMALL["width"], "vit.embeddings."
  t = {e + "patch_embeddings.projection.weight": _torch_patch(w["embedding/kernel"]),
       e + "patch_embeddings.projection.bias": w["embedding/bias"], e + "cls_token": w["cls"],
       e + "position_embeddings": w["pos_embedding"],
       "classifier.weight": np.zeros((5, d), np.float32), "classifier.bias": np.zeros(5, np.float32)}
  _torch_norm(t, "vit.layernorm", w, "Transformer/encoder_norm")
  for i in range(SMALL["depth"]):
    b, s = f"vit.encoder.layer.{i}.", f"Transformer/encoderblock_{i}/"
    a = s + "MultiHeadDotProductAttention_0/"
    _torch_norm(t, b + "layernorm_before", w, s + "LayerNorm_0")
    _torch_norm(t, b + "layernorm_after", w, s + "LayerNorm_1")
    for n in ("query", "key", "value"):
      _torch_linear(t, b + f"attention.attention.{n}", *_heads_merged(w, a, n))
    _torch_linear(t, b + "attention.output.dense", w[a + "out/kernel"].reshape(d, d), w[a + "out/bias"])
    mlp = s + "MlpBlock_0/"
    _torch_linear(t, b + "intermediate.dense", w[mlp + "Dense_0/kernel"], w[mlp + "Dense_0/bias"])
    _torch_linear(t, b + "output.dense", w[mlp + "Dense_1/kernel"], w[mlp + "Dense_1/bias"])
  return {k: np.ascontiguousarray(v) for k, v in t.items()}


@pytest.mark.parametrize("variant", ["big_vision", "vit_jax", "big_vision_no_cls_position", "timm", "hf"])
def test_matches_numpy_reference_vit(tmp_path, variant):
  w = _random_big_vision(seed=0, channels=3)
  reference_weights = dict(w)
  if variant == "big_vision":
    path = str(tmp_path / "vit.npz")
    np.savez(path, **w)
  elif variant == "vit_jax":
    path = str(tmp_path / "vit.npz")
    np.savez(path, **_as_vit_jax(w))
  elif variant == "big_vision_no_cls_position":
    path = str(tmp_path / "vit.npz")
    np.savez(path, **{**w, "pos_embedding": w["pos_embedding"][:, 1:]})
    # No CLS row: the source model adds no position to CLS, which the reference sees as zeros.
    reference_weights["pos_embedding"] = np.concatenate([np.zeros_like(w["cls"]), w["pos_embedding"][:, 1:]], 1)
  elif variant == "timm":
    path = str(tmp_path / "vit.safetensors")
    save_file(_as_timm(w), path)
  else:
    (tmp_path / "hf").mkdir()
    path = str(tmp_path / "hf")
    save_file(_as_hf(w), str(tmp_path / "hf" / "model.safetensors"))

  model, template = _init(32, channels=1, seed=1, num_regions=0)  # no anatomy tokens: a plain ViT
  loaded, report = vit.load_vit_params(path, template, num_heads=SMALL["num_heads"])
  gray = np.random.default_rng(1).uniform(size=(32, 32, 1)).astype(np.float32)
  out = _apply(model, loaded, jnp.asarray(gray[None]))
  ours = np.concatenate([out["cls_token"], out["patch_tokens"].reshape(1, 16, -1)[0]])
  expected = _reference_vit(reference_weights, np.repeat(gray, 3, axis=-1).astype(np.float64))
  assert np.abs(ours - expected).max() < 1e-5
  assert "pos_embedding[anatomy]" not in report.created
  expected_skipped = {"vit_jax": ["head/bias", "head/kernel"], "timm": ["head.weight"],
                      "hf": ["classifier.bias", "classifier.weight"]}.get(variant, [])
  assert sorted(report.skipped) == expected_skipped


def test_hf_vit_matches_transformers(tmp_path):
  torch = pytest.importorskip("torch")
  from transformers import ViTConfig, ViTForImageClassification

  torch.manual_seed(0)
  config = ViTConfig(hidden_size=SMALL["width"], num_hidden_layers=SMALL["depth"],
                     num_attention_heads=SMALL["num_heads"], intermediate_size=SMALL["mlp_dim"], image_size=32,
                     patch_size=SMALL["patch_size"], num_channels=3, hidden_act="gelu", layer_norm_eps=1e-6,
                     num_labels=3)
  hf_model = ViTForImageClassification(config).eval()
  with torch.no_grad():  # HF zero-inits the CLS token and position table; make them count.
    hf_model.vit.embeddings.cls_token.normal_(std=0.2)
    hf_model.vit.embeddings.position_embeddings.normal_(std=0.2)
  hf_model.save_pretrained(str(tmp_path / "hf"))
  model, template = _init(32, channels=1, seed=1, num_regions=0)
  loaded, report = vit.load_vit_params(str(tmp_path / "hf"), template)
  gray = np.random.default_rng(1).uniform(size=(1, 32, 32, 1)).astype(np.float32)
  with torch.no_grad():
    rgb = torch.from_numpy(np.repeat(gray, 3, axis=-1).transpose(0, 3, 1, 2).copy())
    expected = hf_model.vit(pixel_values=rgb).last_hidden_state.numpy()[0]
  out = _apply(model, loaded, jnp.asarray(gray))
  ours = np.concatenate([out["cls_token"], out["patch_tokens"].reshape(1, 16, -1)[0]])
  assert np.abs(ours - expected).max() < 1e-5
  assert sorted(report.skipped) == ["classifier.bias", "classifier.weight"]


# --- errors --------------------------------------------------------------------------------------


def test_wrong_shape_names_key_shapes_and_file(tmp_path):
  w = _random_big_vision()
  w["Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel"] = np.zeros((SMALL["width"], 65), np.float32)
  path = str(tmp_path / "bad.npz")
  np.savez(path, **w)
  with pytest.raises(ValueError) as e:
    vit.load_vit_params(path, _init(32)[1])
  msg = str(e.value)
  assert "bad.npz" in msg and "Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel" in msg
  assert "block_1/mlp/fc1/kernel" in msg and "(32, 65)" in msg and "(32, 64)" in msg


def test_missing_key_names_key_and_file(tmp_path):
  t = _as_timm(_random_big_vision())
  del t["blocks.0.attn.proj.bias"]
  path = str(tmp_path / "bad.safetensors")
  save_file(t, path)
  with pytest.raises(ValueError, match=r"bad\.safetensors: missing key 'blocks\.0\.attn\.proj\.bias'"):
    vit.load_vit_params(path, _init(32)[1])


def test_deeper_checkpoint_is_an_error(tmp_path):
  path = str(tmp_path / "deep.safetensors")
  vit.export_timm_safetensors(_init(32, depth=3)[1], path)
  with pytest.raises(ValueError, match=r"no place in the model \(depth 2.*blocks\.2\."):
    vit.load_vit_params(path, _init(32)[1])


def test_head_count_and_channel_and_grid_errors(tmp_path):
  path = str(tmp_path / "vit.npz")
  np.savez(path, **_random_big_vision())
  with pytest.raises(ValueError, match=r"splits 4 heads but the model has num_heads=8"):
    vit.load_vit_params(path, _init(32)[1], num_heads=8)
  with pytest.raises(ValueError, match=r"'embedding/kernel' has shape \(8, 8, 3, 32\).*\(8, 8, 2, 32\)"):
    vit.load_vit_params(path, _init(32, channels=2)[1])
  np.savez(path, **{**_random_big_vision(), "pos_embedding": np.zeros((1, 7, SMALL["width"]), np.float32)})
  with pytest.raises(ValueError, match=r"'pos_embedding' has 7 rows"):
    vit.load_vit_params(path, _init(32)[1])


def test_unknown_layout(tmp_path):
  path = str(tmp_path / "other.safetensors")
  save_file({"conv1.weight": np.zeros((2, 2), np.float32)}, path)
  with pytest.raises(ValueError, match="no ViT patch embedding found"):
    vit.load_vit_params(path, _init(32)[1])
