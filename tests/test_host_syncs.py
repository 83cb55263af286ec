"""Host syncs of one Co-DINO training step and one eval step (tests/host_syncs.py counts them).

No per-layer sync: the counts do not grow with the number of decoder layers (every layer's losses, and the
positive-query passes at every layer, run without reading a device value). What remains is per step: target
validation (one read), ImageList padding, detectron2's RPN / RoI heads (sampling, asserts, event-storage
statistics) and the positive-query selection; in eval, detectron2's box clipping / empty-box filtering.
(Hungarian matching copies each layer's cost matrix to the host for scipy: a device-to-host copy, not counted
here, and inherent to the official algorithm.)
"""
import pytest
import torch
from detectron2.utils.events import EventStorage

from dino_utils import one_thread  # noqa: F401 (fixture)
from host_syncs import count_host_syncs
from test_collaborative_model import _batch, tiny_codino

pytestmark = pytest.mark.usefixtures("one_thread")


def _train_syncs(layers):
    torch.manual_seed(0)
    model = tiny_codino(layers=layers)
    model.train()
    batch = _batch(3)
    with EventStorage():
        with count_host_syncs() as counts:
            losses = model(batch)
    return counts, len(losses)


def _eval_syncs(layers):
    torch.manual_seed(0)
    model = tiny_codino(layers=layers).eval()
    with torch.no_grad(), count_host_syncs() as counts:
        model(_batch(3))
    return counts


def test_training_step_syncs_do_not_grow_with_decoder_layers():
    (c2, n2), (c4, n4) = _train_syncs(2), _train_syncs(4)
    print(f"\nCo-DINO training step host syncs: 2 layers {dict(c2)} ({sum(c2.values())}), "
          f"4 layers {dict(c4)} ({sum(c4.values())})")
    assert n4 > n2  # more layers, more loss terms
    assert c2 == c4


def test_eval_step_syncs_do_not_grow_with_decoder_layers():
    c2, c4 = _eval_syncs(2), _eval_syncs(4)
    print(f"\nCo-DINO eval step host syncs: {dict(c2)} ({sum(c2.values())})")
    assert c2 == c4
