"""Targets derived from the mask (medseg.models.targets): the edge map Inf-Net's edge output and BCS-Net's boundary
map are trained against, and UM-Net's soft Sobel edges, pixel by pixel on small known masks."""

import pytest
import torch
from tests.baseline_training import toy_batch

from medseg.errors import MedsegError
from medseg.models.targets import mask_edges, mask_sobel_edges, sobel_edges


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


def test_sobel_edges_of_a_step_by_hand():
    mask = torch.zeros(1, 7, 8, dtype=torch.long)
    mask[0, :, 4:] = 1  # a vertical step, the foreground touching the right border
    edges = mask_sobel_edges(mask, (7, 8))
    assert edges.shape == (1, 1, 7, 8) and edges.dtype == torch.float32
    # rows 2-4 see neither the top nor the bottom padding: the 3x3 mean along a row is m = 0, 0, 0, 1/3, 2/3, 1, 1,
    # 2/3; gx = (m[j-1] - m[j+1]) (1 + 2 + 1) / 4 with the conv's zero padding, gy = 0
    gx = torch.tensor([0, 0, -1 / 3, -2 / 3, -2 / 3, -1 / 3, 1 / 3, 1])
    expected = (gx ** 2 + 1e-4).sqrt()
    assert torch.allclose(edges[0, 0, 2:5], expected.expand(3, 8), atol=1e-6)
    assert edges[0, 0, 3, 7] > 1  # on the border the padding's zeros meet the foreground: above 1
    empty = mask_sobel_edges(torch.zeros(1, 5, 5, dtype=torch.long), (5, 5))
    assert torch.allclose(empty, torch.full((1, 1, 5, 5), 0.01))  # sqrt(1e-4): no edge


def test_sobel_target_halves_the_mask_bilinearly_with_aligned_corners():
    g = torch.Generator().manual_seed(0)
    mask = torch.randint(0, 3, (2, 7, 9), generator=g)  # labels 1 and 2 are both foreground
    # align_corners=True maps 7 -> 4 and 9 -> 5 rows / columns onto every other pixel: the halved mask is binary
    assert torch.equal(mask_sobel_edges(mask, (4, 5)), mask_sobel_edges(mask[:, ::2, ::2], (4, 5)))
    with pytest.raises(MedsegError, match=r"\(N, H, W\)"):
        mask_sobel_edges(mask[:, None], (4, 5))


def test_sobel_edges_stay_fp32_under_autocast_and_keep_channels_apart():
    maps = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    plain = sobel_edges(maps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = sobel_edges(maps)
    assert autocast.dtype == torch.float32 and torch.equal(autocast, plain)
    assert torch.equal(plain[:, 1:2], sobel_edges(maps[:, 1:2]))
    with pytest.raises(MedsegError, match=r"\(N, C, H, W\)"):
        sobel_edges(maps[0])
