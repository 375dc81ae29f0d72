"""The competition's mIoU on a case small enough to count by hand (segpipe.metrics)."""

from __future__ import annotations

import numpy as np
import pytest

from segpipe.metrics import MIoU, confusion_matrix, iou_per_class, miou

IGNORE = 255
# two 2x3 images, 4 classes; class 3 is in neither truth nor prediction, one truth pixel is ignored
TRUTH = [np.array([[0, 0, 1], [1, 2, IGNORE]]), np.array([[2, 2, 0], [0, 0, 1]])]
PRED = [np.array([[0, 1, 1], [1, 2, 2]]), np.array([[2, 0, 0], [0, 1, 1]])]
# counted by hand, rows = truth, cols = prediction (the ignored pixel's prediction 2 is left out):
HAND_CM = np.array([[3, 2, 0, 0],
                    [0, 3, 0, 0],
                    [1, 0, 2, 0],
                    [0, 0, 0, 0]])
# IoU = TP / (truth + pred - TP): class 0: 3/(5+4-3); class 1: 3/(3+5-3); class 2: 2/(3+2-2); class 3: absent
HAND_IOU = [3 / 6, 3 / 5, 2 / 3, np.nan]
HAND_MIOU = (3 / 6 + 3 / 5 + 2 / 3) / 3          # 0.5889: the absent class is left out of the mean


def test_confusion_matrix_matches_hand_count():
    cm = sum(confusion_matrix(t, p, 4, IGNORE) for t, p in zip(TRUTH, PRED))
    np.testing.assert_array_equal(cm, HAND_CM)


def test_iou_per_class_and_miou_match_hand_values():
    np.testing.assert_allclose(iou_per_class(HAND_CM), HAND_IOU, equal_nan=True)
    assert miou(HAND_CM) == pytest.approx(HAND_MIOU)


def test_streaming_miou_is_set_level_not_mean_of_images():
    metric = MIoU(4, IGNORE)
    for t, p in zip(TRUTH, PRED):
        metric.update(t, p)
    assert metric.value == pytest.approx(HAND_MIOU)
    # the mean of per-image mIoUs (image A (1/2 + 2/3 + 1)/3, image B 1/2) is a different, wrong number
    per_image = np.mean([miou(confusion_matrix(t, p, 4, IGNORE)) for t, p in zip(TRUTH, PRED)])
    assert per_image == pytest.approx(((1 / 2 + 2 / 3 + 1) / 3 + 1 / 2) / 2)
    assert abs(per_image - metric.value) > 0.02            # 0.6111 vs 0.5889
    assert metric.per_class(["a", "b", "c", "d"]) == pytest.approx({"a": 0.5, "b": 0.6, "c": 2 / 3, "d": None})


def test_ignored_pixel_changes_nothing_whatever_is_predicted_there():
    pred_a = PRED[0].copy()
    pred_a[1, 2] = 3                     # the ignored pixel now predicts the absent class
    cm = confusion_matrix(TRUTH[0], pred_a, 4, IGNORE) + confusion_matrix(TRUTH[1], PRED[1], 4, IGNORE)
    np.testing.assert_array_equal(cm, HAND_CM)
    assert np.isnan(iou_per_class(cm)[3])
