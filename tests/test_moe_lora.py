"""LoRA on MoE experts (``LoraModel(target_parameters=...)``) against the real ``peft`` package on tiny
MoE decoders: outputs and gradients equal PEFT's ``target_parameters`` formula, checkpoints load
both ways (in the layout the installed PEFT writes and in the one older PEFTs wrote), and the
delta trains, saves, loads, merges and detaches exactly."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")

from safetensors.torch import load_file, save_file  # noqa: E402

from odelta_fast import AutoDeltaModel, LoraModel  # noqa: E402
from odelta_fast.methods.moe_lora import ExpertsLoraDelta, peft_semantic_layout  # noqa: E402

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
TOL = 1e-5


def tiny_moe(kind: str, seed: int = 0):
    import transformers

    common = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, tie_word_embeddings=False)
    if kind == "mixtral":
        config = transformers.MixtralConfig(**common, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
        cls = transformers.MixtralForCausalLM
    elif kind == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**common, intermediate_size=64, moe_intermediate_size=24, num_experts=4,
                                             num_experts_per_tok=2, head_dim=8, decoder_sparse_step=1)
        cls = transformers.Qwen3MoeForCausalLM
    else:
        raise KeyError(kind)
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return model.float().eval()


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, 128, (2, 9), generator=g)}


def randomize(delta, seed: int = 1, std: float = 0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in delta.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def peft_model(kind, targets=EXPERTS, r=4, alpha=8, seed=0):
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=[], target_parameters=targets,
                             init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 100)
        return peft.get_peft_model(tiny_moe(kind), config).eval()


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_ours_and_peft_load_each_other(kind, tmp_path):
    batch = inputs()
    # PEFT -> ours
    reference = peft_model(kind)
    expected = logits(reference, batch)
    reference.save_pretrained(tmp_path / "peft")
    model = tiny_moe(kind)
    base = logits(model, batch)
    delta = AutoDeltaModel.from_finetuned(str(tmp_path / "peft"), model)
    assert isinstance(delta.slots[0].delta, ExpertsLoraDelta) and delta.slots[0].delta.grouped
    got = logits(model, batch)
    assert (expected - base).abs().max() > 1e-2  # the adapter does something
    assert (got - expected).abs().max() <= TOL
    # ours -> PEFT
    ours = tiny_moe(kind)
    mine = LoraModel(ours, lora_r=3, lora_alpha=5, modified_modules=[], target_parameters=EXPERTS,
                     rank_pattern={r"layers\.1\.mlp\.experts\.down_proj": 2})
    randomize(mine)
    expected = logits(ours, batch)
    mine.save_finetuned(str(tmp_path / "ours"), format="peft")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["target_modules"] == [] and len(config["target_parameters"]) == 4
    loaded = peft.PeftModel.from_pretrained(tiny_moe(kind), str(tmp_path / "ours")).eval()
    assert (logits(loaded, batch) - expected).abs().max() <= TOL


def _peft_layout_grads(delta_module, semantic):
    """Our factor gradients in PEFT's (E*r, in) / (out, r*E) layout."""
    out = {}
    for name in delta_module.param_names:
        f = delta_module.factors_of(name)
        a, b = f.lora_A.grad, f.lora_B.grad
        if not semantic:
            a, b = b.transpose(1, 2), a.transpose(1, 2)
        E, r = a.shape[0], a.shape[1]
        out[name] = (a.reshape(E * r, -1), b.permute(1, 2, 0).reshape(b.shape[1], r * E))
    return out


def test_gradients_equal_peft(tmp_path):
    batch = inputs(3)
    reference = peft_model("mixtral").train()
    reference.save_pretrained(tmp_path)
    model = tiny_moe("mixtral").train()
    delta = AutoDeltaModel.from_finetuned(str(tmp_path), model)
    delta.freeze_module()
    reference(**batch).logits.square().mean().backward()
    model(**batch).logits.square().mean().backward()
    semantic = peft_semantic_layout(peft.__version__, False, 3)
    experts = reference.base_model.model.model.layers[0].mlp.experts  # down_proj wrapper around gate_up_proj's
    peft_grads = {"down_proj": (experts.lora_A["default"].weight.grad, experts.lora_B["default"].weight.grad),
                  "gate_up_proj": (experts.base_layer.lora_A["default"].weight.grad,
                                   experts.base_layer.lora_B["default"].weight.grad)}
    ours = _peft_layout_grads(delta.slots[0].delta, semantic)
    for name, (ga, gb) in peft_grads.items():
        scale = max(ga.abs().max().item(), gb.abs().max().item(), 1.0)
        assert (ours[name][0] - ga).abs().max() <= 1e-5 * scale, name
        assert (ours[name][1] - gb).abs().max() <= 1e-5 * scale, name


def test_older_peft_layout_loads(tmp_path):
    """PEFT up to 0.18 (and 0.19.0) saved Mixtral's factors the other way round (lora_A on the
    projection's output side): such a file loads to the same outputs."""
    batch = inputs(1)
    reference = peft_model("mixtral")
    expected = logits(reference, batch)
    reference.save_pretrained(tmp_path)
    semantic_now = peft_semantic_layout(peft.__version__, False, 3)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    rewritten = {}
    E = 4
    for key in [k for k in tensors if k.endswith("lora_A.weight")]:
        a, b = tensors[key], tensors[key.replace("lora_A", "lora_B")]
        r = a.shape[0] // E
        a3, b3 = a.reshape(E, r, -1), b.reshape(b.shape[0], r, E).permute(2, 0, 1)
        a3, b3 = b3.transpose(1, 2), a3.transpose(1, 2)  # the other factorisation of the same delta
        rewritten[key] = a3.reshape(E * r, -1).contiguous()
        rewritten[key.replace("lora_A", "lora_B")] = b3.permute(1, 2, 0).reshape(b3.shape[1], r * E).contiguous()
    save_file(rewritten, tmp_path / "adapter_model.safetensors")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["peft_version"] = "0.21.0" if not semantic_now else "0.18.0"
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    model = tiny_moe("mixtral")
    AutoDeltaModel.from_finetuned(str(tmp_path), model)
    assert (logits(model, batch) - expected).abs().max() <= TOL


def test_layout_rule_follows_peft_history():
    assert peft_semantic_layout("0.18.0", False, 3) is False and peft_semantic_layout("0.18.0", True, 3) is True
    assert peft_semantic_layout("0.19.0", False, 3) is False and peft_semantic_layout("0.19.0", True, 3) is False
    assert peft_semantic_layout("0.19.1", False, 3) is True and peft_semantic_layout("0.21.2.dev0@abc", True, 3)
    assert peft_semantic_layout(None, False, 3) and peft_semantic_layout("0.17.0", False, 2)


def test_router_weight_and_single_parameter_match_peft(tmp_path):
    """A 2-D parameter (the router's weight) runs the module's own forward with W + s B A, as
    PEFT does; a single expert parameter is a wrapper of depth 0."""
    batch = inputs(2)
    reference = peft_model("mixtral", targets=["gate.weight", "experts.down_proj"])
    expected = logits(reference, batch)
    reference.save_pretrained(tmp_path)
    model = tiny_moe("mixtral")
    delta = AutoDeltaModel.from_finetuned(str(tmp_path), model)
    kinds = {slot.path.rsplit(".", 1)[-1]: slot.delta.grouped for slot in delta.slots}
    assert kinds == {"gate": False, "experts": True}
    assert (logits(model, batch) - expected).abs().max() <= TOL


def test_trains_saves_loads_merges_detaches(tmp_path):
    batch = inputs(4)
    model = tiny_moe("qwen3_moe")
    base = logits(model, batch)
    experts = model.model.layers[0].mlp.experts
    original = experts.gate_up_proj.detach().clone()
    delta = LoraModel(model, lora_r=4, lora_alpha=8, target_parameters=EXPERTS)  # + default attention targets
    assert {type(s.delta).__name__ for s in delta.slots} == {"LoraDelta", "ExpertsLoraDelta"}
    assert (logits(model, batch) - base).abs().max() == 0  # B = 0: a no-op
    delta.freeze_module()
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        model(**batch).logits.square().mean().backward()
        optimizer.step()
    model.eval()
    trained = logits(model, batch)
    assert experts.lora.gate_up_proj.lora_B.abs().max() > 0 and (trained - base).abs().max() > 1e-4
    delta.save_finetuned(str(tmp_path / "ckpt"))
    fresh = tiny_moe("qwen3_moe")
    AutoDeltaModel.from_finetuned(str(tmp_path / "ckpt"), fresh)
    assert (logits(fresh, batch) - trained).abs().max() <= TOL
    delta.merge()
    assert not torch.equal(experts.gate_up_proj, original)
    assert (logits(model, batch) - trained).abs().max() <= TOL
    delta.unmerge()
    assert torch.equal(experts.gate_up_proj, original)  # bit-exact
    delta.detach()
    assert torch.equal(logits(model, batch), base)
    delta.attach()
    plain = delta.merge_and_unload()
    assert not any("lora" in name for name, _ in plain.named_parameters())
    assert (logits(plain, batch) - trained).abs().max() <= TOL


def test_two_expert_loras_on_one_module_compose():
    batch = inputs(5)
    model = tiny_moe("mixtral")
    first = LoraModel(model, modified_modules=[], target_parameters=EXPERTS, name="first")
    second = LoraModel(model, lora_r=2, modified_modules=[], target_parameters=["experts.down_proj"], name="second")
    randomize(first, 1)
    randomize(second, 2)
    both = logits(model, batch)
    first.merge()  # the merged one lives in the weights, the other still routed
    assert (logits(model, batch) - both).abs().max() <= TOL
    second.merge()
    first.unmerge()
    assert (logits(model, batch) - both).abs().max() <= TOL
    second.unmerge()


def test_errors_name_the_problem():
    model = tiny_moe("mixtral")
    with pytest.raises(ValueError, match="match no parameter"):
        LoraModel(model, modified_modules=[], target_parameters=["experts.nope"])
    with pytest.raises(ValueError, match="lora_dropout must be 0"):
        LoraModel(model, lora_dropout=0.1, modified_modules=[], target_parameters=EXPERTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LoraModel(model, modified_modules=[], target_parameters=EXPERTS)  # no warning on a clean selection
