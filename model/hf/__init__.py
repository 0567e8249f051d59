"""Weights on disk, single-process (no ``parallel/``): Hugging Face DeepSeek-V3 directories in and out,
DeepSeek's FP8 weight format, and this project's own checkpoints read tensor by tensor.

    convert.py            our model <-> transformers' DeepseekV3: config, names, load_hf / save_hf
    export.py             an HF directory planned from metadata, then written shard by shard
    read.py               an HF directory read tensor by tensor (import_hf.py's engine)
    fp8_format.py         DeepSeek's released FP8 format: 128x128 block scales, dequantise / quantise
    safetensors_stream.py one safetensors file written tensor by tensor
    weight_reader.py      a checkpoint's or imported directory's weights, one tensor (or expert rows) at a time
    flat_shards.py        the sharded training state's index and element-range reads
    manifest.py           SHA-256 manifest of a checkpoint directory: written at save, verified before reads
"""
from model.hf.convert import (
                              DTYPES,
                              cast_state_dict,
                              enable_transformers_mtp,
                              from_hf_config,
                              from_hf_state_dict,
                              hf_entries,
                              load_hf,
                              mtp_key_pattern,
                              read_safetensors_dir,
                              save_hf,
                              to_hf_config,
                              to_hf_config_dict,
                              to_hf_state_dict,
                              write_hf_dir,
                              write_hf_entries,
                              write_weights,
)

__all__ = ["DTYPES", "cast_state_dict", "enable_transformers_mtp", "from_hf_config", "from_hf_state_dict", "hf_entries",
           "load_hf", "mtp_key_pattern", "read_safetensors_dir", "save_hf", "to_hf_config", "to_hf_config_dict",
           "to_hf_state_dict", "write_hf_dir", "write_hf_entries", "write_weights"]
