"""mmdit: standalone SD3 / SD3.5 / FLUX.1 transformers with Detail Guidance."""
import os as _os

# In a source checkout kernels/, weights/ and samplers/ sit beside this folder (setup.py
# maps them to mmdit.kernels, ...); let the import system find them there too.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "kernels", "__init__.py")) and _root not in __path__:
    __path__.append(_root)

from .config import PRESETS, FluxConfig, SD3Config, preset  # noqa: E402
from .lora import apply_lora  # noqa: E402
from .ma import MASpec  # noqa: E402
from .models import build_transformer  # noqa: E402
from .pipeline import Pipeline  # noqa: E402
from .tokenizers import load_tokenizer  # noqa: E402
from .weights.encoders import load_text_encoder, load_vae  # noqa: E402
from .weights.transformer import load_transformer  # noqa: E402

__all__ = ["PRESETS", "SD3Config", "FluxConfig", "preset", "MASpec", "build_transformer", "load_transformer",
           "apply_lora", "load_text_encoder", "load_vae", "load_tokenizer", "Pipeline"]
