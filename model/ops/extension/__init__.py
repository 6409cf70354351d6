"""The CPU extension's build command: `python -m model.ops.extension build` (the loader: model/ops/cpu_extension.py)."""
