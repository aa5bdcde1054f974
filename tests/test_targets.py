"""Targets derived from the mask (medseg.models.targets): the edge map Inf-Net's edge output and BCS-Net's boundary
map are trained against, pixel by pixel on small known masks."""

import pytest
import torch
from tests.baseline_training import toy_batch

from medseg.errors import MedsegError
from medseg.models.targets import mask_edges


def _grid(rows: str) -> torch.Tensor:
    return torch.tensor([[int(c) for c in row] for row in rows.split()])


def test_edges_are_the_one_pixel_inner_contour_of_the_foreground():
    mask = _grid("""
        0000000
        0111100
        0112100
        0111100
        0111100
        0000000""")  # label 2 is foreground too
    expected = _grid("""
        0000000
        0111100
        0100100
        0100100
        0111100
        0000000""")
    edges = mask_edges(mask[None])
    assert edges.shape == (1, 1, 6, 7) and edges.dtype == torch.float32
    assert torch.equal(edges[0, 0], expected.float())


def test_diagonal_neighbours_count_and_width_widens_the_band_inwards():
    notch = _grid("""
        11111
        11111
        11110
        11111""")  # (1, 3) touches the background only diagonally: an edge (chessboard distance 1)
    assert torch.equal(mask_edges(notch[None])[0, 0], _grid("""
        00000
        00011
        00010
        00011""").float())  # the image border is no edge
    block = torch.zeros(1, 8, 8, dtype=torch.long)
    block[0, 1:7, 1:7] = 1
    inner = torch.zeros(8, 8)
    inner[3:5, 3:5] = 1
    assert torch.equal(mask_edges(block, width=2)[0, 0], block[0].float() - inner)
    with pytest.raises(MedsegError, match="at least 1"):
        mask_edges(block, width=0)


def test_edges_of_the_toy_batch_and_of_empty_and_full_masks():
    _, truth = toy_batch(64)
    edges = mask_edges(truth)
    assert edges.shape == (2, 1, 64, 64)
    assert edges.sum((1, 2, 3)).tolist() == [2 * (24 + 32) - 4, 4 * 24 - 4]  # the two rectangles' contours
    assert bool(((edges[:, 0] == 1) <= (truth > 0)).all())  # inside the foreground only
    assert mask_edges(torch.zeros(1, 8, 8, dtype=torch.long)).sum() == 0
    assert mask_edges(torch.ones(1, 8, 8, dtype=torch.long)).sum() == 0
    with pytest.raises(MedsegError, match=r"\(N, H, W\)"):
        mask_edges(truth[:, None])
