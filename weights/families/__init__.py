"""One module per model family: what its checkpoints look like.

Each module holds:

    FAMILY              the config's ``family`` ("sd3", "flux", ...)
    NAME                how ``mmdit inspect`` names it
    CONFIG              its config dataclass (``mmdit.models.<family>``)
    MARKERS             {"original": key, "diffusers": key}: a key only that layout of that family has
    DIFFUSERS_CLASSES   the ``_class_name`` values of its diffusers config.json
    TABLE               rows ``(ours, diffusers, op)`` (``weights.keymaps`` explains them)
    fields_from_shapes(shapes, where)   config fields from the shapes of our names
    fields_from_json(config_json, where)  config fields from a diffusers config.json (None where silent)
    finish_fields(fields, where)         optional: a last check of the fields before the config is built

A new family is a new module here and one entry in ``FAMILIES``.
"""
from . import chroma, flux, flux2, qwen_image, qwen_image21, sd3

FAMILIES = {m.FAMILY: m for m in (sd3, flux, flux2, qwen_image, qwen_image21, chroma)}
