"""Evaluation on the test split: quality, ablation, robustness, slices, calibration, speed."""
