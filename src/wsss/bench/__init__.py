"""Benchmarks over several runs (``wsss bench ...``): each benchmark drives ordinary runs and tabulates their files."""

from wsss.bench.methods import bench_methods, failed_runs, format_stat, load_method_overrides, markdown_table

__all__ = ["bench_methods", "failed_runs", "format_stat", "load_method_overrides", "markdown_table"]
