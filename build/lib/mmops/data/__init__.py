"""Datasets: the manifest contract and splits, image checks, validation, versions, demo data."""
