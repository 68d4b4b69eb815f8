"""mmdit: standalone MMDiT diffusion transformers (SD3 / SD3.5, FLUX.1) with Detail Guidance.

    models/       the transformers, one file per family, and what they share (rows, attention)
    encoders/     text encoders, VAEs, tokenizers
    ma/           massive activations: spec, probe, calibration, cache, the one policy, the report
    distributed/  several ranks: process group, branch parallel, sequence parallel
    kernels/ weights/ samplers/   (top-level folders of the checkout, see below)
    pipeline.py, image_modes.py, cli.py, lora.py, fp8.py, compiled.py, train.py, tiny/

The public names below are imported on first use (PEP 562), so ``import mmdit`` costs next
to nothing; submodules (``mmdit.samplers``, ``mmdit.ma``, ...) load the same way.

Where kernels/, weights/ and samplers/ come from: they are subpackages of mmdit that live at
the top of the checkout (the project's layout). setup.py's ``package_dir`` installs them as
``mmdit.kernels``, ``mmdit.weights`` and ``mmdit.samplers``; in a plain checkout the lines
below let the import system find them there too. A checkout's root on ``sys.path`` also makes
``kernels`` importable on its own, which transformers probes for (Hugging Face's ``kernels``
package): kernels/__init__.py then hands back ``mmdit.kernels`` instead of a second copy.
"""
import importlib as _importlib
import os as _os

_root = _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__)))  # through a link to mmdit/ too
if _os.path.isfile(_os.path.join(_root, "kernels", "__init__.py")) and _root not in __path__:
    __path__.append(_root)

# public name -> the module that defines it
_PUBLIC = {
    "PRESETS": ".models.config", "SD3Config": ".models.config", "FluxConfig": ".models.config",
    "QwenImageConfig": ".models.config", "QwenImage21Config": ".models.config",
    "ChromaConfig": ".models.config", "preset": ".models.config",
    "MASpec": ".ma",
    "apply_lora": ".lora",
    "build_transformer": ".models",
    "load_transformer": ".weights.transformer",
    "load_text_encoder": ".weights.encoders", "load_vae": ".weights.encoders",
    "load_tokenizer": ".encoders.tokenizers",
    "load_decoder_lm": ".weights.decoder_lm", "load_lm_text": ".encoders.prompts",
    "Pipeline": ".pipeline",
}
__all__ = list(_PUBLIC)


def lazy_names(package: str, public: dict, submodules: bool = False):
    """``__getattr__`` and ``__dir__`` for a package whose ``public`` names (name -> the module,
    relative to ``package``, that defines it) are imported on first use; ``submodules``: other
    names are tried as submodules (``mmdit.samplers``, ``mmdit.ma``, ...)."""
    def __getattr__(name: str):
        module = _importlib.import_module(package)
        if name in public:
            value = getattr(_importlib.import_module(public[name], package), name)
            setattr(module, name, value)
            return value
        if submodules:
            try:
                return _importlib.import_module(f".{name}", package)
            except ModuleNotFoundError as e:
                if e.name != f"{package}.{name}":
                    raise
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(vars(_importlib.import_module(package))) | set(public))

    return __getattr__, __dir__


__getattr__, __dir__ = lazy_names(__name__, _PUBLIC, submodules=True)
