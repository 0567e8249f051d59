"""Small model configs shared by the model tests (fp32, CPU, a few thousand parameters)."""
from __future__ import annotations

from model.config import ModelConfig

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                num_hidden_layers=3, num_attention_heads=4, n_shared_experts=1, n_routed_experts=8,
                kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
                n_group=4, topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1,
                max_position_embeddings=256, num_nextn_predict_layers=0)
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on right now (for test process groups)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PicklePayload:
    """What a hostile file carries: unpickling it creates ``sentinel`` (open(path, "w")), so a test
    can prove that a loader never ran it. The class itself is not needed to unpickle it."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (open, (self.sentinel, "w"))
