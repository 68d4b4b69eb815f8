"""mmdit: standalone SD3 / SD3.5 / FLUX.1 transformers with Detail Guidance.

The public names below are imported on first use (PEP 562), so ``import mmdit`` costs next
to nothing and pulls in neither torch's optional friends nor the hub client; submodules
(``mmdit.samplers``, ``mmdit.ma``, ``mmdit.tiny``, ...) load the same way on first access.
"""
import importlib as _importlib
import os as _os

# In a source checkout kernels/, weights/ and samplers/ sit beside this folder (setup.py
# maps them to mmdit.kernels, ...); let the import system find them there too.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "kernels", "__init__.py")) and _root not in __path__:
    __path__.append(_root)

# public name -> the module that defines it
_PUBLIC = {
    "PRESETS": ".config", "SD3Config": ".config", "FluxConfig": ".config", "preset": ".config",
    "MASpec": ".ma",
    "apply_lora": ".lora",
    "build_transformer": ".models",
    "load_transformer": ".weights.transformer",
    "load_text_encoder": ".weights.encoders", "load_vae": ".weights.encoders",
    "load_tokenizer": ".tokenizers",
    "Pipeline": ".pipeline",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(_importlib.import_module(_PUBLIC[name], __name__), name)
        globals()[name] = value
        return value
    try:  # a submodule: mmdit.samplers, mmdit.ma, ...
        return _importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
