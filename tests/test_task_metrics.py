"""Task metrics against hand computations worked out here, edge cases, and independent
implementations (scipy where installed; one-hot covariances and conlleval's chunk rules written
out below)."""

import math

import numpy as np
import pytest

from sslm_jax.finetune import metrics as task_metrics


def _from_confusion(counts_KK):
  """labels/predictions with exactly these [true, predicted] counts."""
  pairs = [(t, p) for t, row in enumerate(counts_KK) for p, n in enumerate(row) for _ in range(n)]
  labels, predictions = zip(*pairs, strict=True)
  return np.array(labels), np.array(predictions)


# ---------------------------------------------------------------------------- classification


def test_three_class_worked_example():
  # Confusion matrix, rows true, columns predicted:
  #        p0 p1 p2 | t_k
  #   t0 [  3  1  0 ]  4
  #   t1 [  1  2  2 ]  5
  #   t2 [  0  1  1 ]  2
  #  p_k    4  4  3   s = 11, trace c = 6
  counts = [[3, 1, 0], [1, 2, 2], [0, 1, 1]]
  labels, predictions = _from_confusion(counts)
  got = task_metrics.classification(labels, predictions, num_classes=3)
  # accuracy = 6 / 11
  assert got["accuracy"] == pytest.approx(6 / 11)
  # F1_k = 2TP / (2TP + FP + FN):
  #   class 0: TP 3, FP 4-3=1, FN 4-3=1 -> 6/8 = 3/4
  #   class 1: TP 2, FP 4-2=2, FN 5-2=3 -> 4/9
  #   class 2: TP 1, FP 3-1=2, FN 2-1=1 -> 2/5
  # macro = (3/4 + 4/9 + 2/5) / 3 = (135 + 80 + 72) / 180 / 3 = 287 / 540
  assert got["macro_f1"] == pytest.approx(287 / 540)
  # MCC: numerator c*s - sum p_k t_k = 66 - (16 + 20 + 6) = 24
  #      s^2 - sum p_k^2 = 121 - (16 + 16 + 9) = 80
  #      s^2 - sum t_k^2 = 121 - (16 + 25 + 4) = 76
  #      MCC = 24 / sqrt(80 * 76) = 24 / sqrt(6080) ~ 0.30779
  assert got["mcc"] == pytest.approx(24 / math.sqrt(6080))
  assert got["mcc"] == pytest.approx(0.30779, abs=1e-5)


def test_confusion_matrix_orientation():
  # One example of true class 0 predicted as 2: row 0, column 2.
  counts = task_metrics.confusion_matrix([0], [2], num_classes=3)
  assert counts.tolist() == [[0, 0, 1], [0, 0, 0], [0, 0, 0]]


def test_binary_mcc_matches_the_two_by_two_formula_and_phi():
  # TP 5 (1->1), TN 3 (0->0), FP 2 (0->1), FN 1 (1->0)
  labels, predictions = _from_confusion([[3, 2], [1, 5]])
  got = task_metrics.classification(labels, predictions, num_classes=2)
  # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (15 - 2) / sqrt(7*6*5*4) = 13/sqrt(840)
  assert got["mcc"] == pytest.approx(13 / math.sqrt(840))
  # The phi coefficient is Pearson's r of the two 0/1 vectors.
  assert got["mcc"] == pytest.approx(np.corrcoef(labels, predictions)[0, 1])
  # F1: class 1 2*5/(10+2+1) = 10/13, class 0 2*3/(6+1+2) = 6/9; mean of the two.
  assert got["macro_f1"] == pytest.approx((10 / 13 + 6 / 9) / 2)


def test_macro_f1_leaves_out_classes_absent_from_both_sides():
  # labels [0 0 1 1], predictions [0 2 1 1], num_classes 4:
  #   class 0: TP 1, FP 0, FN 1 -> 2/3;  class 1: TP 2 -> 1;  class 2: TP 0, FP 1 -> 0 (counts)
  #   class 3: no true, no predicted -> left out, so the mean is over 3 classes, not 4.
  got = task_metrics.classification([0, 0, 1, 1], [0, 2, 1, 1], num_classes=4)
  assert got["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
  assert got["accuracy"] == pytest.approx(3 / 4)


def test_all_one_class():
  perfect = task_metrics.classification([1] * 5, [1] * 5, num_classes=3)
  # Only class 1 is present, with F1 1 (averaging over all 3 classes would give 1/3);
  # t = p = (0, 5, 0): s^2 - sum p^2 = 25 - 25 = 0 -> MCC 0 by convention.
  assert perfect == {"accuracy": 1.0, "macro_f1": 1.0, "mcc": 0.0}
  wrong = task_metrics.classification([0] * 4, [2] * 4, num_classes=3)
  assert wrong == {"accuracy": 0.0, "macro_f1": 0.0, "mcc": 0.0}
  # A constant predictor on mixed labels: t = (2, 2), p = (4, 0), s^2 - sum p^2 = 0 -> 0.
  constant = task_metrics.classification([0, 1, 0, 1], [0, 0, 0, 0], num_classes=2)
  assert constant["mcc"] == 0.0
  # class 0: 2*2/(2*2+2+0) = 2/3, class 1 (true but never predicted): 0
  assert constant["macro_f1"] == pytest.approx(1 / 3)


def test_perfect_and_inverted_multiclass():
  labels = np.array([0, 1, 2, 0, 1, 2, 2])
  assert task_metrics.classification(labels, labels, 3)["mcc"] == pytest.approx(1.0)
  assert task_metrics.classification([0, 1, 0, 1], [1, 0, 1, 0], 2)["mcc"] == pytest.approx(-1.0)


def _one_hot_mcc(labels, predictions, num_classes):
  """Gorodkin's definition: cov(X, Y) / sqrt(cov(X, X) cov(Y, Y)) over one-hot rows."""
  x = np.eye(num_classes)[labels]
  y = np.eye(num_classes)[predictions]
  x, y = x - x.mean(axis=0), y - y.mean(axis=0)
  return np.sum(x * y) / math.sqrt(np.sum(x * x) * np.sum(y * y))


def _mask_macro_f1(labels, predictions, num_classes):
  scores = []
  for k in range(num_classes):
    true_k, pred_k = labels == k, predictions == k
    if not (true_k.any() or pred_k.any()):
      continue
    tp = np.sum(true_k & pred_k)
    precision = tp / pred_k.sum() if pred_k.any() else 0.0
    recall = tp / true_k.sum() if true_k.any() else 0.0
    scores.append(0.0 if tp == 0 else 2 * precision * recall / (precision + recall))
  return np.mean(scores)


@pytest.mark.parametrize("seed", range(5))
def test_classification_matches_independent_formulations(seed):
  rng = np.random.default_rng(seed)
  num_classes = 6  # class 5 never occurs below, so the present-classes rule is exercised
  labels = rng.integers(0, 5, size=200)
  predictions = np.where(rng.random(200) < 0.5, labels, rng.integers(0, 5, size=200))
  got = task_metrics.classification(labels, predictions, num_classes)
  assert got["accuracy"] == pytest.approx(np.mean(labels == predictions))
  assert got["mcc"] == pytest.approx(_one_hot_mcc(labels, predictions, num_classes))
  assert got["macro_f1"] == pytest.approx(_mask_macro_f1(labels, predictions, num_classes))


def test_classification_rejects_bad_input():
  with pytest.raises(ValueError, match="outside"):
    task_metrics.classification([0, 3], [0, 1], num_classes=3)
  with pytest.raises(ValueError, match="outside"):
    task_metrics.classification([0, 1], [0, -1], num_classes=3)
  with pytest.raises(ValueError, match="differ"):
    task_metrics.classification([0, 1], [0], num_classes=3)
  with pytest.raises(ValueError, match="integer"):
    task_metrics.classification([0.0, 1.0], [0, 1], num_classes=3)
  with pytest.raises(ValueError, match="empty"):
    task_metrics.classification([], [], num_classes=3)


# ---------------------------------------------------------------------------- regression


def test_regression_worked_example():
  # targets x = [1 2 3 4], predictions y = [2 4 5 9]
  # x - 2.5 = [-1.5 -0.5 0.5 1.5], y - 5 = [-3 -1 0 4]
  # sum xy = 4.5 + 0.5 + 0 + 6 = 11, sum x^2 = 5, sum y^2 = 26 -> r = 11 / sqrt(130)
  # both strictly increasing -> spearman 1; squared errors [1 4 4 25] -> mse 34/4
  got = task_metrics.regression([1, 2, 3, 4], [2, 4, 5, 9])
  assert got["pearson"] == pytest.approx(11 / math.sqrt(130))
  assert got["spearman"] == pytest.approx(1.0)
  assert got["mse"] == pytest.approx(8.5)


def test_spearman_uses_average_ranks_for_ties():
  # x = [1 2 2 3] -> ranks [1 2.5 2.5 4];  y = [1 3 2 4] -> ranks [1 3 2 4]; both mean 2.5
  # centred: [-1.5 0 0 1.5] and [-1.5 0.5 -0.5 1.5]
  # sum xy = 2.25 + 2.25 = 4.5, sum x^2 = 4.5, sum y^2 = 5 -> rho = 4.5 / sqrt(22.5) ~ 0.94868
  # (ordinal ranks [1 2 3 4] would give 0.8; 1 - 6 sum d^2 / (n(n^2-1)) would give 0.95)
  got = task_metrics.regression([1, 2, 2, 3], [1, 3, 2, 4])
  assert got["spearman"] == pytest.approx(4.5 / math.sqrt(22.5))
  assert task_metrics.average_ranks(np.array([3.0, 1.0, 3.0, 3.0, 0.5])).tolist() == [
    4.0, 2.0, 4.0, 4.0, 1.0,
  ]  # fmt: skip


def test_constant_side_gives_zero_correlations_not_nan():
  # 0.1 * 3 does not average back to exactly 0.1, so a centred-sum test would not see it.
  for constant in ([2.0, 2.0, 2.0], [0.1, 0.1, 0.1]):
    for got in (
      task_metrics.regression(constant, [1.0, 2.0, 4.0]),
      task_metrics.regression([1.0, 2.0, 4.0], constant),
    ):
      assert got["pearson"] == 0.0 and got["spearman"] == 0.0
  single = task_metrics.regression([1.0], [3.0])
  assert single == {"pearson": 0.0, "spearman": 0.0, "mse": 4.0}


def test_anticorrelated_and_nonlinear_monotone():
  got = task_metrics.regression([1, 2, 3], [3, 2, 1])
  assert got["pearson"] == pytest.approx(-1.0) and got["spearman"] == pytest.approx(-1.0)
  x = np.arange(1.0, 8.0)
  got = task_metrics.regression(x, np.exp(x))
  assert got["spearman"] == pytest.approx(1.0) and got["pearson"] < 0.95


@pytest.mark.parametrize("seed", range(3))
def test_regression_matches_scipy(seed):
  stats = pytest.importorskip("scipy.stats")
  rng = np.random.default_rng(seed)
  targets = rng.integers(0, 6, size=50).astype(float)  # many ties
  predictions = targets + rng.integers(-2, 3, size=50)
  got = task_metrics.regression(targets, predictions)
  assert got["pearson"] == pytest.approx(stats.pearsonr(targets, predictions)[0])
  assert got["spearman"] == pytest.approx(stats.spearmanr(targets, predictions)[0])
  for values in (targets, predictions):
    assert task_metrics.average_ranks(values) == pytest.approx(stats.rankdata(values))


def test_regression_rejects_bad_input():
  with pytest.raises(ValueError, match="differ"):
    task_metrics.regression([1.0, 2.0], [1.0])
  with pytest.raises(ValueError, match="non-finite"):
    task_metrics.regression([1.0, float("nan")], [1.0, 2.0])
  with pytest.raises(ValueError, match="empty"):
    task_metrics.regression([], [])


# ---------------------------------------------------------------------------- entity F1


def test_entity_f1_worked_example():
  true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "I-ORG", "O"]]
  pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "I-ORG", "O", "O"]]
  # true: PER(row 0, 0..2) LOC(0, 3..4) ORG(1, 0..3)
  # pred: PER(0, 0..2)     ORG(0, 3..4) ORG(1, 0..2)  -> only PER matches: 1 of 3 each way
  # tokens: row 0 misses position 3, row 1 misses position 2 -> 6 / 8
  got = task_metrics.entity_f1(true, pred)
  assert got["precision"] == pytest.approx(1 / 3)
  assert got["recall"] == pytest.approx(1 / 3)
  assert got["f1"] == pytest.approx(1 / 3)
  assert got["token_accuracy"] == pytest.approx(6 / 8)


def test_entity_f1_unequal_precision_and_recall():
  # 2 true entities, 1 predicted and right: P = 1, R = 1/2, F1 = 2 * 1/2 / (3/2) = 2/3
  got = task_metrics.entity_f1([["B-PER", "O", "B-LOC"]], [["B-PER", "O", "O"]])
  assert (got["precision"], got["recall"]) == (1.0, 0.5)
  assert got["f1"] == pytest.approx(2 / 3)


def test_entity_f1_is_micro_averaged_over_types():
  # PER: 3 true, 3 right. LOC: 1 true, predicted as MISC.
  # micro: 3 hits / 4 predicted / 4 true -> 0.75; a per-type macro mean would be (1 + 0) / 2.
  true = [["B-PER", "O", "B-PER", "O", "B-PER", "B-LOC"]]
  pred = [["B-PER", "O", "B-PER", "O", "B-PER", "B-MISC"]]
  assert task_metrics.entity_f1(true, pred)["f1"] == pytest.approx(0.75)


def test_bio_boundaries():
  def spans(tags):
    return sorted((start, end, kind) for _, start, end, kind in task_metrics.entities(tags))

  # I- after O (or at the start) opens an entity, as conlleval does.
  assert spans(["O", "I-PER", "I-PER", "O"]) == [(1, 3, "PER")]
  assert spans(["I-PER"]) == [(0, 1, "PER")]
  # I-X does not continue an entity of another type: it starts its own.
  assert spans(["B-PER", "I-LOC", "I-LOC"]) == [(0, 1, "PER"), (1, 3, "LOC")]
  # B-X right after X closes the open entity and starts a new one.
  assert spans(["B-PER", "I-PER", "B-PER"]) == [(0, 2, "PER"), (2, 3, "PER")]
  # An entity running to the end of the row is closed there.
  assert spans(["O", "B-ORG", "I-ORG"]) == [(1, 3, "ORG")]
  assert spans(["O", "O"]) == [] and spans([]) == []


def test_boundary_mismatches_are_misses():
  # One 3-token PER against two PERs (0..2, 2..3): no exact match at all.
  got = task_metrics.entity_f1([["B-PER", "I-PER", "I-PER"]], [["B-PER", "I-PER", "B-PER"]])
  assert got["f1"] == 0.0 and got["token_accuracy"] == pytest.approx(2 / 3)
  # "O I-PER" predicted for "O B-PER" is the same entity.
  got = task_metrics.entity_f1([["O", "B-PER"]], [["O", "I-PER"]])
  assert got["f1"] == 1.0 and got["token_accuracy"] == 0.5


def test_no_entities():
  # No entities on either side: every ratio has a zero denominator -> 0.0 (conlleval, seqeval).
  got = task_metrics.entity_f1([["O", "O"], []], [["O", "O"], []])
  assert got == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "token_accuracy": 1.0}
  # Entities only in the truth: nothing predicted -> precision 0 (not NaN), recall 0.
  got = task_metrics.entity_f1([["B-PER", "O"]], [["O", "O"]])
  assert got == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "token_accuracy": 0.5}


def test_entity_f1_rejects_bad_input():
  with pytest.raises(ValueError, match="row 1"):
    task_metrics.entity_f1([["O"], ["O", "O"]], [["O"], ["O"]])
  with pytest.raises(ValueError, match="rows"):
    task_metrics.entity_f1([["O"]], [])
  with pytest.raises(ValueError, match="row 0.*'PER'"):
    task_metrics.entity_f1([["PER"]], [["O"]])
  with pytest.raises(ValueError, match="'E-PER'"):
    task_metrics.entity_f1([["O"]], [["E-PER"]])
  with pytest.raises(ValueError, match="no tokens"):
    task_metrics.entity_f1([[]], [[]])


def _conlleval_chunks(tags):
  """conlleval's startOfChunk / endOfChunk rules for IOB2 tags, as a second implementation."""
  chunks, start = [], None
  prev_tag, prev_type = "O", ""
  for i, tag in enumerate([*tags, "O"]):
    tag_prefix, tag_type = (tag, "") if tag == "O" else tag.split("-", 1)
    end = prev_tag in "BI" and (tag_prefix in "BO" or (tag_prefix == "I" and prev_type != tag_type))
    begin = tag_prefix == "B" or (tag_prefix == "I" and (prev_tag == "O" or prev_type != tag_type))
    if end:
      chunks.append((start, i, prev_type))
    if begin:
      start = i
    prev_tag, prev_type = tag_prefix, tag_type
  return chunks


def test_entity_f1_matches_conlleval_rules_on_random_tags():
  rng = np.random.default_rng(0)
  vocab = ["O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
  true = [[vocab[i] for i in rng.integers(0, 6, size=rng.integers(0, 9))] for _ in range(60)]
  pred = [[t if rng.random() < 0.7 else vocab[rng.integers(0, 6)] for t in row] for row in true]
  true_chunks = {(r, *c) for r, row in enumerate(true) for c in _conlleval_chunks(row)}
  pred_chunks = {(r, *c) for r, row in enumerate(pred) for c in _conlleval_chunks(row)}
  hits = len(true_chunks & pred_chunks)
  assert 0 < hits < len(true_chunks)  # the random case is neither trivial nor perfect
  got = task_metrics.entity_f1(true, pred)
  assert got["precision"] == pytest.approx(hits / len(pred_chunks))
  assert got["recall"] == pytest.approx(hits / len(true_chunks))
  for row in true:
    assert task_metrics.entities(row) == {(0, *c) for c in _conlleval_chunks(row)}
