"""mxptq: post-training MX (microscaling) quantization of LLMs driven by TOML recipes."""

__version__ = "0.1.0"
