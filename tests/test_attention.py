"""model.attention: the fused path (jax.nn.dot_product_attention, cuDNN on a GPU) computes what the
plain path does, and every choice that cannot run here falls back to the plain path, saying so."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avlm_jax.models import layers
from avlm_jax.models.anatomy_vlm import build_model
from tests.conftest import tiny_config


def _qkv_mask(seed=0, b=2, t=7, n=2, h=8):
  ks = jax.random.split(jax.random.key(seed), 3)
  q, k, v = (jax.random.normal(key, (b, t, n, h), jnp.float32) for key in ks)
  mask = jnp.array([[1] * t, [1] * 4 + [0] * (t - 4)], jnp.int32)  # the second text is padded
  return q, k, v, mask


@pytest.mark.parametrize("masked", [True, False])
def test_fused_attention_equals_the_plain_path_in_outputs_and_gradients(masked):
  q, k, v, mask = _qkv_mask()
  mask = mask if masked else None
  plain = lambda q, k, v: layers.plain_attention(q, k, v, mask, jnp.float32)  # noqa: E731
  fused = lambda q, k, v: layers.fused_attention(q, k, v, mask, implementation="xla")  # noqa: E731
  np.testing.assert_allclose(fused(q, k, v), plain(q, k, v), rtol=1e-5, atol=1e-6)
  loss = lambda f: lambda q, k, v: (f(q, k, v) * jnp.cos(jnp.arange(8.0))).sum()  # noqa: E731
  for g_fused, g_plain in zip(jax.grad(loss(fused), (0, 1, 2))(q, k, v), jax.grad(loss(plain), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(g_fused, g_plain, rtol=1e-5, atol=1e-6)
  if masked:  # a padded key gets no weight: changing its value changes nothing
    v2 = v.at[1, 5:].set(100.0)
    np.testing.assert_allclose(fused(q, k, v2), fused(q, k, v), rtol=1e-6)


def test_each_choice_resolves_where_it_can_run_and_says_so_when_it_falls_back():
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # 'xla' and 'auto' fall back quietly
    assert layers.resolve_attention("xla", jnp.bfloat16, 0.0, "gpu") == "xla"
    assert layers.resolve_attention("auto", jnp.bfloat16, 0.0, "gpu") == "cudnn"
    assert layers.resolve_attention("auto", jnp.bfloat16, 0.0, "cpu") == "xla"
    assert layers.resolve_attention("auto", jnp.float32, 0.0, "gpu") == "xla"
    assert layers.resolve_attention("cudnn", jnp.float16, 0.0, "gpu") == "cudnn"
  for dtype, dropout, platform, why in ((jnp.bfloat16, 0.0, "cpu", "the backend is 'cpu'"),
                                        (jnp.float32, 0.0, "gpu", "needs bfloat16 or float16"),
                                        (jnp.bfloat16, 0.1, "gpu", "no attention dropout")):
    with pytest.warns(UserWarning, match=f"model.attention='cudnn' falls back to the XLA path: .*{why}"):
      assert layers.resolve_attention("cudnn", dtype, dropout, platform) == "xla"
  with pytest.raises(ValueError, match="config.model.attention='flash'; expected one of"):
    layers.resolve_attention("flash", jnp.float32, 0.0)


def test_a_model_asking_for_cudnn_on_this_cpu_runs_the_plain_path_with_the_same_params():
  cfg = tiny_config()
  x, phrases, prompts = jnp.zeros((1, 32, 32, 1)), jnp.ones((1, 29, 16), jnp.int32), jnp.ones((5, 12), jnp.int32)
  plain = build_model(cfg.model, 64)
  params = plain.init({"params": jax.random.key(0)}, x, phrases, prompts)["params"]
  cfg.model.attention = "cudnn"
  with pytest.warns(UserWarning, match="falls back to the XLA path"):
    asked = build_model(cfg.model, 64)
  assert asked.image.attention == asked.text.attention == "xla"
  out_a, out_b = plain.apply({"params": params}, x, phrases, prompts), asked.apply({"params": params}, x, phrases, prompts)
  np.testing.assert_array_equal(out_a["image_emb"], out_b["image_emb"])
