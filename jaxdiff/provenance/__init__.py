"""What made an image or a checkpoint, recorded where it travels with it.

    recipe     the recipe of every PNG jaxdiff writes (text chunks), read back and replayed
    watermark  the invisible watermark diffusers' SDXL pipelines embed, and its detector
    run        a training run's provenance.json and MODEL_CARD.md

    from jaxdiff import provenance
    provenance.read_recipe("generated.png")          # dict; `jaxdiff info generated.png` prints it
    provenance.detect_watermark(image)               # True when the SDXL mark is there
"""

from jaxdiff.provenance.recipe import (  # noqa: F401
    KINDS,
    PARAMETERS_KEY,
    RECIPE_KEY,
    RecipeError,
    adapter,
    check_recipe,
    checkpoint_fingerprint,
    command_args,
    enabled,
    format_recipe,
    make_recipe,
    parameters_text,
    params_fingerprint,
    parse_recipe,
    png_info,
    read_recipe,
    save_png,
    weights_fingerprint,
)
from jaxdiff.provenance.watermark import (  # noqa: F401
    WATERMARK_BITS,
    WATERMARK_MESSAGE,
    detect_watermark,
    embed_watermark,
    read_watermark_bits,
    watermark_scores,
)
