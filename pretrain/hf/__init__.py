"""Hugging Face interchange: `export.py` writes a loopstack checkpoint as a transformers model (config.json,
safetensors, the modelling code `configuration_loopstack.py` / `modeling_loopstack.py` for trust_remote_code, and
the tokenizer); `convert.py` turns a pretrained Hugging Face checkpoint into a loopstack run. docs/hf.md.
"""
