"""Quantize stage: int8 post-training quantization from a folder of calibration images."""
