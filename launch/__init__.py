"""Thin entry points: training (`launch.train`) and launch scripts."""
