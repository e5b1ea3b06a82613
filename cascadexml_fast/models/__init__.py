"""CascadeXML and LightXML: a Hugging Face encoder plus the package's label heads, behind one protocol
(tokenize / encode / loss_from_features / predict_from_features / param_groups / save_pretrained).

transformers is imported only when a model is built or loaded.
"""
from .base import EncoderConfig, XMCModel, load_pretrained
from .cascadexml import CascadeXML, CascadeXMLConfig, default_level_layers
from .lightxml import LightXML, LightXMLConfig, build_shortlist, force_positives

__all__ = [
    "CascadeXML",
    "CascadeXMLConfig",
    "EncoderConfig",
    "LightXML",
    "LightXMLConfig",
    "XMCModel",
    "build_shortlist",
    "default_level_layers",
    "force_positives",
    "load_pretrained",
]
