import pytest

from avlm_jax import anatomy


def test_twenty_nine_unique_regions_in_rgrg_order():
  assert anatomy.NUM_REGIONS == 29
  assert len(set(anatomy.REGION_NAMES)) == 29
  assert [r.id for r in anatomy.REGIONS] == list(range(29))
  assert anatomy.REGION_NAMES[0] == "right lung"
  assert anatomy.REGION_NAMES[8] == "left lung"
  assert anatomy.REGION_NAMES[-1] == "abdomen"
  assert anatomy.region_id("cardiac silhouette") == 24


def test_sides():
  sides = {r.name: r.side for r in anatomy.REGIONS}
  assert sides["right costophrenic angle"] == "right"
  assert sides["left hemidiaphragm"] == "left"
  assert sides["carina"] == "midline"
  assert sum(s == "right" for s in sides.values()) == 10  # 8 lung regions + clavicle + atrium
  assert sum(s == "left" for s in sides.values()) == 9


def test_mirror():
  assert anatomy.mirror("right upper lung zone") == "left upper lung zone"
  assert anatomy.mirror("left clavicle") == "right clavicle"
  assert anatomy.mirror("right atrium") == "right atrium"  # no left counterpart in the 29
  assert anatomy.mirror("spine") == "spine"
  for name in anatomy.REGION_NAMES:
    assert anatomy.mirror(anatomy.mirror(name)) == name


def test_unknown_region_names_the_value_and_suggests():
  with pytest.raises(KeyError, match="right lung zone.*Did you mean"):
    anatomy.region_id("right lung zone")
