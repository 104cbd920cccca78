"""fastprompt: fast prompt tuning of CLIP models (DePT, DPL and their base methods)."""
__version__ = "0.1.0"

from fastprompt.clip import ClipBundle, load_clip  # noqa: E402
from fastprompt.methods import METHOD_NAMES, build_model, method_defaults  # noqa: E402

__all__ = ["ClipBundle", "load_clip", "build_model", "method_defaults", "METHOD_NAMES", "__version__"]
