"""codetr.export.match_detections (the rank-free parity measure of the ONNX export) on hand-built detections: two
near-tied candidates swapping ranks and one entering the top-k at its boundary, as happens between ONNX Runtime and
eager; the expected pairs and differences are worked out by hand."""
import pytest
import torch

from codetr.export import match_detections


def _eager():
    boxes = torch.tensor([[0, 0, 10, 10], [20, 20, 40, 40], [20, 20, 40, 40], [50, 50, 60, 70], [70, 0, 90, 10]], dtype=torch.float32)
    scores = torch.tensor([0.50, 0.40, 0.3999, 0.30, 0.10])
    labels = torch.tensor([1, 2, 3, 1, 0])
    return boxes, scores, labels


def test_swapped_ranks_and_boundary_candidate():
    rb, rs, rl = _eager()
    # ranks 1 and 2 (one query, two classes, near-tied scores) swapped; rank 4 replaced by a candidate the eager
    # top-k does not have (it entered at the boundary)
    boxes = torch.tensor([[0.01, 0, 10, 10], [20, 20, 40.02, 40], [20, 20, 40, 40], [50, 50, 60, 70], [100, 100, 120, 130]])
    scores = torch.tensor([0.50002, 0.40005, 0.39995, 0.30, 0.1001])
    labels = torch.tensor([1, 3, 2, 1, 0])
    # rank by rank, ranks 1, 2 and 4 compare unrelated detections
    assert ((labels == rl) & ((boxes - rb).abs().amax(-1) <= 1)).tolist() == [True, False, False, True, False]
    m = match_detections(boxes, scores, labels, rb, rs, rl, box_tol=1.0)
    assert m["matched"].tolist() == [True, True, True, True, False]
    assert m["ref_index"].tolist() == [0, 2, 1, 3, -1]
    assert m["ref_matched"].tolist() == [True, True, True, True, False]
    expected_box = torch.tensor([0.01, 0.02, 0.0, 0.0], dtype=torch.float64)
    expected_score = torch.tensor([0.00002, 0.40005 - 0.3999, 0.40 - 0.39995, 0.0], dtype=torch.float64)
    torch.testing.assert_close(m["box_diff"][:4], expected_box, atol=1e-6, rtol=0)
    torch.testing.assert_close(m["score_diff"][:4], expected_score, atol=1e-6, rtol=0)
    # the unmatched one: nearest label-0 eager box is [70, 0, 90, 10]: largest coordinate difference 120
    assert m["box_diff"][4].item() == pytest.approx(120.0)


def test_one_to_one_and_label_mismatch():
    rb, rs, rl = _eager()
    # two label-1 detections near eager rank 0 (0.3 and 0.5 px): only the nearer is its match; a detection whose
    # label the eager side lacks matches nothing (distance inf)
    boxes = torch.tensor([[0.5, 0, 10, 10], [0.3, 0, 10, 10], [20, 20, 40, 40]])
    scores = torch.tensor([0.5, 0.5, 0.4])
    labels = torch.tensor([1, 1, 7])
    m = match_detections(boxes, scores, labels, rb, rs, rl)
    assert m["matched"].tolist() == [False, True, False]
    assert m["ref_index"].tolist() == [-1, 0, -1]
    assert torch.isinf(m["box_diff"][2]) and torch.isinf(m["score_diff"][2])
    assert m["ref_matched"].tolist() == [True, False, False, False, False]
    # beyond box_tol: no match even when nearest
    far = match_detections(rb[:1] + 2.0, rs[:1], rl[:1], rb, rs, rl, box_tol=1.0)
    assert far["matched"].tolist() == [False] and far["box_diff"].item() == pytest.approx(2.0)


def test_bad_shapes():
    rb, rs, rl = _eager()
    with pytest.raises(ValueError, match=r"\(k, 4\)"):
        match_detections(rb[:, :3], rs, rl, rb, rs, rl)
    with pytest.raises(ValueError, match="one per box"):
        match_detections(rb, rs[:3], rl, rb, rs, rl)
