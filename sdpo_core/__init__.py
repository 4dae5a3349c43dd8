"""sdpo-gym's trainer: SDPO as a drop-in subclass of TRL's GRPOTrainer."""

from sdpo_core.config import PRESETS, SDPOConfig

__all__ = ["PRESETS", "SDPOConfig", "SDPOTrainer"]


def __getattr__(name: str):
    # The trainer pulls in TRL and transformers; import it only when asked for.
    if name == "SDPOTrainer":
        from sdpo_core.trainer import SDPOTrainer

        return SDPOTrainer
    raise AttributeError(name)
