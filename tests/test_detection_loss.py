import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avlm_jax.losses import detection


def xyxy_to_cxcywh(b):
  b = np.asarray(b, np.float32)
  return np.stack([(b[..., 0] + b[..., 2]) / 2, (b[..., 1] + b[..., 3]) / 2, b[..., 2] - b[..., 0],
                   b[..., 3] - b[..., 1]], -1)


@pytest.mark.parametrize("a, b, expected", [
    ((0, 0, 2, 2), (0, 0, 2, 2), 1.0),                  # identical
    ((0, 0, 2, 2), (1, 1, 3, 3), 1 / 7 - 2 / 9),        # overlap: I=1, U=7, C=9
    ((0, 0, 1, 1), (2, 2, 3, 3), 0 - (9 - 2) / 9),      # disjoint: I=0, U=2, C=9
    ((0, 0, 4, 4), (1, 1, 2, 2), 1 / 16),               # nested: I=1, U=16, C=16
    ((0, 0, 1, 1), (1, 0, 2, 1), 0.0),                  # touching edges: I=0, U=2, C=2
])
def test_giou_hand_computed(a, b, expected):
  got = detection.generalized_box_iou(jnp.array(a, jnp.float32), jnp.array(b, jnp.float32))
  assert float(got) == pytest.approx(expected, abs=1e-6)


def test_giou_degenerate_boxes_are_finite_with_finite_gradients():
  point = jnp.array([0.5, 0.5, 0.5, 0.5])       # zero width and height
  line = jnp.array([0.2, 0.5, 0.8, 0.5])        # zero height
  box = jnp.array([0.0, 0.0, 1.0, 1.0])
  # A zero-area box inside a unit box: I=0, U=1, C=1 -> GIoU 0.
  assert float(detection.generalized_box_iou(point, box)) == pytest.approx(0.0, abs=1e-6)
  assert float(detection.generalized_box_iou(point, point)) == pytest.approx(0.0, abs=1e-6)
  # Two parallel degenerate lines 0.2 apart: I=U=0, C=0.6*0.2 -> GIoU = -1.
  other = jnp.array([0.2, 0.7, 0.8, 0.7])
  assert float(detection.generalized_box_iou(line, other)) == pytest.approx(-1.0, abs=1e-5)
  g = jax.grad(lambda p: detection.generalized_box_iou(p, point))(point)
  assert np.all(np.isfinite(g))


def test_detection_loss_l1_and_giou_with_absent_boxes():
  pred_xyxy = np.array([[[0, 0, 0.5, 0.5], [0.1, 0.1, 0.3, 0.3], [0.2, 0.2, 0.4, 0.6]]], np.float32)
  true_xyxy = np.array([[[0, 0, 0.5, 0.5], [0.2, 0.2, 0.4, 0.4], [9, 9, 9, 9]]], np.float32)  # 3rd is garbage
  present = np.array([[1, 1, 0]], np.float32)
  pred, true = xyxy_to_cxcywh(pred_xyxy), xyxy_to_cxcywh(true_xyxy)
  out = detection.detection_loss(jnp.asarray(pred), jnp.asarray(true), jnp.asarray(present))
  # Region 0 exact: L1 0, GIoU 1. Region 1: centres differ by 0.1 in x and y, sizes equal -> L1 0.2;
  # boxes (0.1..0.3) and (0.2..0.4): I=0.01, U=0.07, C=0.09 -> GIoU = 1/7 - 2/9.
  assert float(out["l1"]) == pytest.approx((0.0 + 0.2) / 2, abs=1e-6)
  assert float(out["giou"]) == pytest.approx((0.0 + (1 - (1 / 7 - 2 / 9))) / 2, abs=1e-6)
  assert float(out["num_boxes"]) == 2
  grads = jax.grad(lambda p: sum(detection.detection_loss(p, jnp.asarray(true), jnp.asarray(present))[k]
                                 for k in ("l1", "giou")))(jnp.asarray(pred))
  assert np.all(np.isfinite(grads))
  np.testing.assert_array_equal(grads[0, 2], 0.0)  # the absent region gets no gradient


def test_detection_loss_without_any_box_is_zero_not_nan():
  z = jnp.zeros((2, 29, 4))
  out = detection.detection_loss(z, z, jnp.zeros((2, 29)))
  assert float(out["l1"]) == 0.0 and float(out["giou"]) == 0.0
