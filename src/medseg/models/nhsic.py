"""The nHSIC penalty of Fovea-UNet's H-GhostNet (Liu et al., "Fovea-UNet: detection and segmentation of lymph
node metastases in colorectal cancer with deep learning", BioMedical Engineering OnLine 2023, section "H-Ghost
backbone", Eq. 10-13): the normalised Hilbert-Schmidt independence criterion between the intrinsic channels of
one Ghost module, which training drives down so the channels carry complementary information.

The paper's definition (Eq. 11-13): L_nHSIC = alpha sum_{i != j} nHSIC(I_i, I_j), where I_i in R^{s x p} is
intrinsic feature map i (the i-th output channel of the layer's primary convolution) "with p neurons,
evaluated on the same s samples"; nHSIC(I_i, I_j) = tr(K~_i K~_j), K~ = K_bar (K_bar + eps s I_s)^-1, K_bar the
centred s x s kernel matrix (H K H, H = I - 11^T / s), eps "a small constant".

What a sample is, for a segmentation network, is the one open point; two readings:
- images (ours, implemented): sample a = one image of the mini-batch (s = batch size), and the channel's p
  neurons are its h' x w' activations on that image. The paper's I in R^{s x p} with "p neurons evaluated on the
  same s samples" is the notation of Kornblith et al. (its ref. 35: n examples x p neurons), its D is "m
  independently identical distribution samples" (the images of a shuffled batch are; the positions of one image
  are not), and K~ with eps m I_m is the HSIC bottleneck's normalised estimator, whose samples are the
  batch's examples.
- cells (`samples="cells"`, an option): sample = a spatial cell of an image, batch x 4 x 4 average-pooled
  cells of one value each (p = 1). It gives many samples, but contradicts "p neurons" and the i.i.d. samples;
  at batch 4 it still tells channels apart (0.49 independent against 5.07 duplicated random channels).
Measured consequence of the paper's reading (tests/test_fovea_unet.py checks it): with s images, K_bar has rank
s - 1, and when its eigenvalues are large against eps s, K~ is nearly the centring projector H, so nHSIC is near
s - 1 for any two non-constant channels; at the paper's batch of 4 it is 2.94 both for independent and for
identical 32 x 32 random channels (eps 1e-3). The penalty separates channels only with many samples and few
neurons per sample, e.g. 256 images of 1 x 1 maps: 0.17 independent, 4.59 identical.

Where the paper is silent, ours: a Gaussian kernel whose sigma^2 is the median pairwise squared distance
(detached) of each channel, eps = 1e-3, alpha = 1 / (m (m - 1)) (the mean over ordered channel pairs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SAMPLES = ("images", "cells")


def image_samples(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (C, B, H W): intrinsic map i as I_i in R^{s x p}, s = B images, p = H W neurons."""
    return features.flatten(2).transpose(0, 1)


def cell_samples(features: torch.Tensor, grid: int = 4) -> torch.Tensor:
    """(B, C, H, W) -> (C, B grid^2, 1): each channel observed on a grid x grid average-pooled layout of every
    image, one value per cell. (Patches of up to 8 x 8 values as samples failed: Gaussian kernels on
    64-dimensional samples of noise all look alike.)"""
    return F.adaptive_avg_pool2d(features, grid).transpose(0, 1).reshape(features.shape[1], -1, 1)


def normalised_kernels(samples: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """(m, s, p) -> (m, s, s) K~ = K_bar (K_bar + eps s I)^-1 with K_bar = H K H and a Gaussian kernel whose
    sigma^2 is the median pairwise squared distance (detached) of each channel (paper Eq. 11-13)."""
    samples = samples.double()
    count = samples.shape[1]
    distances = torch.cdist(samples, samples).pow(2)
    off_diagonal = ~torch.eye(count, dtype=torch.bool, device=samples.device)
    sigma2 = distances.detach()[:, off_diagonal].median(dim=1).values.clamp(min=1e-12)
    kernel = torch.exp(-distances / (2 * sigma2.view(-1, 1, 1)))
    centred = (kernel - kernel.mean(dim=1, keepdim=True) - kernel.mean(dim=2, keepdim=True)
               + kernel.mean(dim=(1, 2), keepdim=True))
    identity = torch.eye(count, dtype=samples.dtype, device=samples.device)
    # K_bar and (K_bar + eps s I)^-1 commute, so K~ = solve(K_bar + eps s I, K_bar) is the same matrix
    return torch.linalg.solve(centred + eps * count * identity, centred)


def nhsic_penalty(features: torch.Tensor, max_channels: int | None = None, eps: float = 1e-3,
                  generator: torch.Generator | None = None, samples: str = "images") -> torch.Tensor:
    """Mean over ordered channel pairs i != j of nHSIC(I_i, I_j) = tr(K~_i K~_j) for one layer's (B, C, H, W)
    intrinsic features, the batch's images as samples (paper Eq. 10-13 with alpha = 1 / (m (m - 1)), ours).
    Every channel by default (the paper's sum); `max_channels` random ones to bound the cost. All pairs at once
    from one m x m Gram matrix of the flattened K~ (K~ is symmetric). Zero below two images or two channels."""
    batch, channels = features.shape[:2]
    if channels < 2 or (batch < 2 and samples == "images"):
        return features.new_zeros(())
    if max_channels is not None and channels > max_channels:
        device = generator.device if generator else "cpu"
        chosen = torch.randperm(channels, generator=generator, device=device)[:max_channels]
        features = features[:, chosen.to(features.device)]
    observed = image_samples(features) if samples == "images" else cell_samples(features)
    flat = normalised_kernels(observed, eps).flatten(1)  # (m, s^2)
    gram = flat @ flat.T
    m = gram.shape[0]
    return ((gram.sum() - gram.diagonal().sum()) / (m * (m - 1))).to(features.dtype)
