"""fastprompt: fast prompt tuning of CLIP models (DePT, DPL and their base methods)."""
__version__ = "0.1.0"
