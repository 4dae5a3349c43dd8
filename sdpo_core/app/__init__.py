"""The application around the SDPO library: the `sdpo` command line, training and evaluation runs (data loading,
held-out splits, callbacks, curves), the demo model's weights and CPU thread fitting.

It is a client of the library's public API (`sdpo_core.SDPOTrainer`, `SDPOConfig`, `PRESETS`, and the modules
the library documents); the library never imports it (an import-linter contract in pyproject.toml).
"""
