import numpy as np
import pytest
from scipy import stats

from mtkit.evaluate import metrics_for, primary, write_predictions


def test_regression_metrics_match_scipy():
    rng = np.random.default_rng(0)
    labels = rng.uniform(0, 5, 50)
    pred = labels + rng.normal(0, 1, 50)
    cos = rng.uniform(-1, 1, 50)
    m = metrics_for("pair_regression", {"pred": pred, "cosine": cos}, labels)
    assert m["pearson"] == pytest.approx(stats.pearsonr(pred, labels)[0])
    assert m["spearman"] == pytest.approx(stats.spearmanr(pred, labels)[0])
    assert m["cosine_pearson"] == pytest.approx(stats.pearsonr(cos, labels)[0])
    assert m["cosine_spearman"] == pytest.approx(stats.spearmanr(cos, labels)[0])
    assert primary("pair_regression", m) == pytest.approx((m["pearson"] + 1) / 2)


def test_classification_accuracy_and_f1():
    labels = np.array([1, 0, 1, 1, 0, 0])
    pred = np.array([1, 0, 0, 1, 1, 0])
    m = metrics_for("pair_classification", {"pred": pred}, labels)
    assert m["acc"] == pytest.approx(4 / 6)
    # tp = 2, fp = 1, fn = 1
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    five = metrics_for("classification", {"pred": np.array([0, 4, 3])}, np.array([0, 4, 2]))
    assert five == {"acc": pytest.approx(2 / 3)}


def test_constant_predictions_do_not_crash():
    labels = np.array([0.0, 1.0, 2.0])
    m = metrics_for("pair_regression", {"pred": np.ones(3), "cosine": np.ones(3)}, labels)
    assert m["pearson"] == 0.0


def test_prediction_file_format(tmp_path):
    path = tmp_path / "p" / "sts-dev-output.csv"
    write_predictions(path, "pair_regression", {"ids": ["a", "b"], "pred": np.array([1.5, 2.0])})
    assert path.read_text() == "id \t Predicted_Similiarity \na , 1.5 \nb , 2.0 \n"
    path = tmp_path / "sst-dev-output.csv"
    write_predictions(path, "classification", {"ids": ["x"], "pred": np.array([3])})
    assert path.read_text() == "id \t Predicted_Sentiment \nx , 3 \n"
