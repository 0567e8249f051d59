"""Run state registered by its owner: a component that the checkpoint code has never heard of is saved
and restored through its registration alone (JSON and sharded tensors), on a real engine from the
one ordered build, through real checkpoint files; and the registry's own rules."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from parallel.state.registry import RunState
from tests.helpers import free_port

TINY = ["model.vocab_size=320", "model.hidden_size=32", "model.intermediate_size=48", "model.moe_intermediate_size=16",
        "model.num_hidden_layers=2", "model.num_attention_heads=2", "model.n_routed_experts=4", "model.n_group=2",
        "model.topk_group=1", "model.num_experts_per_tok=2", "model.q_lora_rank=16", "model.kv_lora_rank=8",
        "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=4", "model.v_head_dim=8",
        "model.num_nextn_predict_layers=0", "model.max_position_embeddings=64", "data.seq_len=16",
        "train.micro_batch_size=2"]


class Odometer:
    """A dummy component: a JSON counter and a (5,) tensor of its own, sharded as one slice."""

    def __init__(self):
        self.trips = 0
        self.wear = torch.zeros(5)

    def state_dict(self) -> dict:
        return {"trips": self.trips}

    def load_state_dict(self, saved: dict) -> None:
        self.trips = saved["trips"]

    def tensor_state(self) -> dict:
        return {"odometer/wear": ((5,), 0, self.wear)}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    from configs.schema import load_config
    from parallel.build import build_training
    from parallel.engine import skip_shm_allreduce_buffers
    from parallel.state import checkpoint

    torch.set_num_threads(1)
    skip_shm_allreduce_buffers()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    cfg = load_config(None, TINY)
    device = torch.device("cpu")

    engine = build_training(cfg, device, 1).engine
    odo = Odometer()
    odo.trips, odo.wear = 7, torch.arange(5.0) * 1.5
    state = RunState()
    state.register_value("config", cfg.to_dict())
    state.register("odometer", odo)
    path = checkpoint.save(engine, out, 3, state, keep_last=1)

    fresh_engine = build_training(cfg, device, 1).engine
    fresh = Odometer()
    fresh_state = RunState()
    fresh_state.register("odometer", fresh)
    checkpoint.load(fresh_engine, path, checkpoint.read_state(path), fresh_state)
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump({"path": str(path), "trips": fresh.trips, "wear": fresh.wear.tolist()}, f)


@pytest.mark.slow
def test_a_new_component_is_saved_and_restored_through_its_registration_alone(tmp_path):
    out = tmp_path / "run"
    mp.start_processes(_worker, args=(free_port(), str(out)), nprocs=1, join=True, start_method="spawn")
    got = json.loads((out / "result.json").read_text())
    assert got["trips"] == 7
    assert got["wear"] == [0.0, 1.5, 3.0, 4.5, 6.0]
    saved = json.loads(open(os.path.join(got["path"], "trainer_state.json")).read())
    assert saved["odometer"] == {"trips": 7}
    keys = list(saved)     # plain entries, the checkpoint's own, then components that also save tensors
    assert keys.index("config") < keys.index("step") < keys.index("odometer")
    index = json.loads(open(os.path.join(got["path"], "state", "index.json")).read())["tensors"]
    assert index["odometer/wear"]["size"] == [5]


def test_registry_refuses_a_key_twice_and_an_owner_without_state():
    state = RunState()
    state.register("a", Odometer())
    with pytest.raises(ValueError, match="'a' is registered twice"):
        state.register("a", Odometer())
    with pytest.raises(TypeError, match="'b': object has no state_dict"):
        state.register("b", object())
    with pytest.raises(ValueError, match="'a' collides with the checkpoint's own entry"):
        state.state_dict({"a": 1})


def test_values_are_saved_but_never_loaded_and_missing_keys_leave_owners_as_built():
    odo = Odometer()
    state = RunState()
    state.register_value("config", {"x": 1})
    state.register("odometer", odo)
    assert state.state_dict({"step": 3}) == {"config": {"x": 1}, "step": 3, "odometer": {"trips": 0}}
    state.load_state_dict({"config": {"x": 2}})          # an older checkpoint without "odometer"
    assert odo.trips == 0 and state.state_dict()["config"] == {"x": 1}
