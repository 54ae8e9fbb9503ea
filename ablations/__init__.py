"""Ablation studies around speedrun.py: tricks.py, grid.py, optimizers.py, merge.py; study.py is their shared runner."""
