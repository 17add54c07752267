import jax.numpy as jnp
import ml_collections
import pytest

from avlm_jax.train import schedule
from configs import common


def _stages(g, f):
  return ml_collections.ConfigDict(dict(global_start=g, fine_start=f))


@pytest.mark.parametrize("g, f, total, expected", [
    (0.0, 0.0, 100, (0, 0)),
    (0.2, 0.5, 100, (20, 50)),
    (30.0, 60.0, 100, (30, 60)),
    (0.25, 60.0, 200, (50, 60)),
])
def test_stage_starts(g, f, total, expected):
  assert schedule.stage_starts(_stages(g, f), total) == expected


def test_stage_order_and_sign_errors():
  with pytest.raises(ValueError, match="fine_start \\(step 10\\) precedes global_start \\(step 50\\)"):
    schedule.stage_starts(_stages(0.5, 10.0), 100)
  with pytest.raises(ValueError, match="global_start=-1.0 is negative"):
    schedule.stage_starts(_stages(-1.0, 0.0), 100)


@pytest.mark.parametrize("step, stage, w_global, w_fine", [
    (0, 1, 0.0, 0.0), (19, 1, 0.0, 0.0), (20, 2, 0.5, 0.0), (49, 2, 0.5, 0.0), (50, 3, 0.5, 2.0),
])
def test_loss_weights_switch_on_by_stage(step, stage, w_global, w_fine):
  loss = common.base_config().loss
  with loss.unlocked():
    loss.global_weight, loss.fine_weight = 0.5, 2.0
  w = schedule.loss_weights(jnp.int32(step), loss, (20, 50))
  assert float(w["stage"]) == stage
  assert float(w["global_weight"]) == w_global
  assert float(w["fine_weight"]) == w_fine
  assert float(w["anatomy_weight"]) == 1.0 and float(w["l1_weight"]) == 5.0
