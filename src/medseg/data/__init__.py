"""Data: folder and nnU-Net formats, reading, integrity checks, splits, transforms, the demo phantom."""
