"""Local lm-eval task configs (``fl_*.yaml``) that read the zero-shot benchmarks' release files.

Each YAML reproduces one stock lm-eval task (prompt, target, choices, metrics) but loads its data
through :mod:`flatten_lightning.tasks.loaders` from a directory given at run time as the task
metadata key ``fl_data_dir``, instead of from the Hugging Face hub. Pass this folder to
``lm_eval.tasks.TaskManager(include_path=TASKS_DIR, metadata={"fl_data_dir": ...})``.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
