"""vlora: distributed QLoRA fine-tuning for vision-language models, Qwen2.5-VL first."""

__version__ = "0.1.0"
