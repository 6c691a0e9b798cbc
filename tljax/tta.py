"""Test-time augmentation: several deterministic views of each image, softmax averaged."""

from __future__ import annotations

# eval.tta → the number of views it evaluates ('none' is the plain eval transform).
MODES = {'none': 1}
