"""Vision-language support: image loading (media), preprocessing, timm towers, the projector and
the EncoderPool. Importing the package first makes torchvision importable on CPU-only torch."""

from vision.torchvision_shim import ensure_torchvision

ensure_torchvision()
