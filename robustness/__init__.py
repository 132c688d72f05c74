"""Robustness evaluation of ImageNet classifiers: ImageNet-C (mCE), -A, -R, -Sketch."""
