from mtkit.model.encoder import Encoder, resolve_model_path
from mtkit.model.heads import DECODERS, HEADS, make_head
from mtkit.model.multitask import MultiTaskModel, build_model

__all__ = ["Encoder", "resolve_model_path", "DECODERS", "HEADS", "make_head", "MultiTaskModel", "build_model"]
