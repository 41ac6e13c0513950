"""Benchmarks and evaluations, above the product code: they import it, it never imports them."""
