import numpy as np
import pytest
from PIL import Image

from helpers import write_image
from emolens.data import load_dataset
from emolens.preprocessing import Preprocessing
from emolens.regions import dataset_region_boxes, map_boxes, padded_boxes, stimuli_boxes
from emolens.taxonomy import EMOTIONROI


def test_components_become_boxes_largest_first():
    values = np.zeros((20, 30), np.float32)
    values[2:5, 3:6] = 1.0  # 9 px
    values[10:18, 12:28] = 0.8  # 128 px
    values[0, 29] = 0.9  # a single pixel: noise below min_area
    boxes = map_boxes(values, threshold=0.5, max_boxes=3, min_area=4)
    assert boxes.tolist() == [[12, 10, 28, 18], [3, 2, 6, 5]]
    assert map_boxes(values, threshold=0.5, max_boxes=1).tolist() == [[12, 10, 28, 18]]
    # the threshold is a fraction of the peak: at 0.9 only the brightest square is left
    assert map_boxes(values, threshold=0.9).tolist() == [[3, 2, 6, 5]]


def test_maps_without_positive_values_have_no_regions():
    assert map_boxes(np.zeros((5, 5))).shape == (0, 4)
    assert map_boxes(-np.ones((5, 5))).shape == (0, 4)
    with pytest.raises(ValueError, match="2-D"):
        map_boxes(np.zeros((2, 5, 5)))


def test_stimuli_map_boxes_land_in_the_model_crop(tmp_path):
    stimuli = np.zeros((100, 200), np.uint8)  # landscape 200x100
    stimuli[20:60, 120:160] = 255
    Image.fromarray(stimuli).save(tmp_path / "map.png")
    pre = Preprocessing(size=50, crop_pct=1.0, interpolation="bilinear")
    # shorter side 100 -> 50 (scale 0.5): the 200-px width becomes 100, cropped to the central 50 (x 25..75)
    (box,) = stimuli_boxes(tmp_path / "map.png", pre)
    assert box == pytest.approx([35, 10, 50, 30], abs=1)


def test_padded_boxes():
    out = padded_boxes([np.ones((2, 4)), np.zeros((0, 4)), np.ones((5, 4))], 3)
    assert out.shape == (3, 3, 4)
    assert np.isnan(out[0, 2]).all() and np.isnan(out[1]).all() and not np.isnan(out[2]).any()


def test_dataset_region_boxes_from_emotionroi(tmp_path):
    for emotion in EMOTIONROI.classes:
        write_image(tmp_path / "images" / emotion / "1.jpg", size=(64, 64))
    stimuli = np.zeros((64, 64), np.uint8)
    stimuli[8:24, 30:60] = 255
    (tmp_path / "ground_truth" / "joy").mkdir(parents=True)
    Image.fromarray(stimuli).save(tmp_path / "ground_truth" / "joy" / "1.jpg")
    ds = load_dataset(f"emotionroi={tmp_path}")
    boxes = dataset_region_boxes(ds, Preprocessing(size=64, crop_pct=1.0))
    joy = next(i for i, s in enumerate(ds.samples) if s.path.parent.name == "joy")
    assert boxes.shape == (len(ds), 3, 4)
    assert boxes[joy, 0] == pytest.approx([30, 8, 60, 24], abs=1) and np.isnan(boxes[joy, 1:]).all()
    assert all(np.isnan(boxes[i]).all() for i in range(len(ds)) if i != joy)


def test_dataset_without_region_maps_is_refused(tmp_path):
    from helpers import make_ldl_dataset

    ds = load_dataset(make_ldl_dataset(tmp_path, per_class=2))
    with pytest.raises(ValueError, match="regions=cam"):
        dataset_region_boxes(ds, Preprocessing(size=32))
