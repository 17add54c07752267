"""Evaluation of Anatomy-VLM checkpoints: zero-shot image-level and anatomy-wise scores, box
localisation, segmentation transfer, the baselines beside them, pictures and a Markdown report.

`registry.run_evals` runs the configured evaluators (`config.evals.<name>`) on one model;
`runner.evaluate_checkpoint` adds the baselines and writes metrics.json + report.md.
"""
