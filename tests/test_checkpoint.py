"""Each role reads only its own tensors, from single-file and sharded safetensors checkpoints."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from msc.checkpoint import CheckpointReader
from msc.compiler import compile_spec
from msc.errors import MscError
from msc.spec import parse_spec
from tests.conftest import TINY


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory):
    cfg = dict(TINY)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    path = tmp_path_factory.mktemp("ckpt") / "sharded"
    model.save_pretrained(path, max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path, model


def test_expert_node_loads_only_its_rows(sharded_checkpoint, tmp_path):
    path, model = sharded_checkpoint
    bundle = compile_spec(parse_spec({"model": {"path": str(path)}, "plan": {"experts": {"nodes": 2}}}), tmp_path / "b")
    state = model.state_dict()
    exp1 = bundle.load_program("expert.1")
    gu = exp1.get_submodule("model.layers.1.mlp.experts").gate_up_proj
    assert torch.equal(gu, state["model.layers.1.mlp.experts.gate_up_proj"][2:4])
    names = {n for n, _ in exp1.named_buffers()} | {n for n, _ in exp1.named_parameters()}
    assert names and all(".experts." in n for n in names)
    att = bundle.load_program("attention")
    att_names = {n for n, _ in att.named_parameters()} | {n for n, _ in att.named_buffers()}
    assert not any(".experts." in n for n in att_names)
    assert torch.equal(att.get_submodule("model.layers.0.mlp.gate").weight, state["model.layers.0.mlp.gate.weight"])


def test_reader_slices_rows_without_reading_the_rest(sharded_checkpoint):
    path, model = sharded_checkpoint
    r = CheckpointReader(path)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(r.read(key, (3, 7)), model.state_dict()[key][3:7])
    with pytest.raises(MscError, match="has no tensor 'nope'"):
        r.read("nope")


def test_missing_checkpoint_files_are_reported(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MscError, match="no model.safetensors"):
        CheckpointReader(tmp_path)


def test_single_file_reader_agrees_with_safetensors(tmp_path):
    """msc parses safetensors headers itself: every dtype, 0-d and empty tensors must read as the library reads them."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(5, 3, generator=g), "bf16": torch.randn(4, 2, 3, generator=g).to(torch.bfloat16),
        "f16": torch.randn(7, generator=g).half(), "i64": torch.arange(6).view(2, 3), "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4),
    }
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ref = load_file(tmp_path / "model.safetensors")
    r = CheckpointReader(tmp_path)
    assert r.keys() == set(tensors)
    for k, t in ref.items():
        got = r.read(k)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), k
    assert torch.equal(r.read("bf16", (1, 3)), ref["bf16"][1:3])
    assert r.bytes_read == sum(t.numel() * t.element_size() for t in ref.values()) + 2 * 2 * 3 * 2
    r.close()


def test_truncated_checkpoint_is_reported(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(100, 10)}, tmp_path / "model.safetensors")
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-400])
    r = CheckpointReader(tmp_path)
    assert torch.equal(r.read("w", (0, 50)), torch.ones(50, 10))  # the rows before the cut are still there
    with pytest.raises(MscError, match="ends inside tensor 'w' \\(truncated checkpoint\\)"):
        r.read("w")
    r.close()
