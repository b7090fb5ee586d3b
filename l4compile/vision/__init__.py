"""Multimodal Llama 4: image preprocessing (``image``), prompt layout (``layout``) and the vision program."""
from l4compile.vision.image import ImageSpec, ProcessedImage, load_image, preprocess
from l4compile.vision.layout import ImageTokens, expand_prompt, image_block, place_features

__all__ = ["ImageSpec", "ImageTokens", "ProcessedImage", "expand_prompt", "image_block", "load_image",
           "place_features", "preprocess"]
