"""Datasets: prepared skeleton arrays and the generated demo data."""
from .synthetic import make_synthetic

__all__ = ["make_synthetic"]
