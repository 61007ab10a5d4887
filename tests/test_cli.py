"""``odelta-fast train / merge / inspect / env / bench`` on tiny model directories written with
``save_pretrained`` (no hub). Commands run in-process through ``cli.main`` (importing torch and
transformers once, not per command); one test runs the real executable to check what a user
sees on stderr."""
from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from odelta_fast import AutoDeltaModel
from odelta_fast.cli import main
from odelta_fast.commands import run_state
from odelta_fast.commands import train as train_cmd

from tiny_models import tiny_model

WORDS = "the a movie meal trip book was is great awful good bad fine dull fun nice poor".split()
POSITIVE, NEGATIVE = ["great", "good", "fun", "nice"], ["awful", "bad", "dull", "poor"]


# ---------------------------------------------------------------------- fixtures
def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    # Ids 0-2 agree with the tiny configs' pad/bos/eos ids.
    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   bos_token="[BOS]", eos_token="[EOS]")


def _model_dir(root: Path, kind: str, **overrides) -> Path:
    directory = root / kind
    model, _ = tiny_model(kind, **overrides)
    model.save_pretrained(str(directory))
    _tokenizer().save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Tiny model directories and datasets shared by the tests of this module (read-only)."""
    root = tmp_path_factory.mktemp("cli")
    rng = random.Random(0)
    cls_rows = []
    for i in range(24):
        label = i % 2
        cls_rows.append({"text": f"the movie was {rng.choice(POSITIVE if label else NEGATIVE)}", "label": label})
    (root / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cls_rows))
    (root / "cls.csv").write_text("text,label\n" + "".join(
        f"{r['text']},{'pos' if r['label'] else 'neg'}\n" for r in cls_rows))
    lm_lines = [f"the {rng.choice(WORDS)} was {rng.choice(WORDS)}" for _ in range(20)]
    (root / "lm.csv").write_text("text\n" + "".join(line + "\n" for line in lm_lines))
    (root / "lm.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in lm_lines))
    return {
        "root": root,
        "bert": _model_dir(root, "bert"),
        "llama": _model_dir(root, "llama"),
        # GPT-2: Conv1D layout, fused qkv and lm_head tied to the embeddings.
        "gpt2": _model_dir(root, "gpt2"),
    }


def test_main_leaves_logging_as_it_found_it(capsys):
    """In-process callers (these tests, notebooks) keep their logging setup: later caplog-based
    tests still see odelta_fast's records."""
    logger = logging.getLogger("odelta_fast")
    before = (logger.level, list(logger.handlers), logger.propagate)
    assert main(["env"]) == 0
    assert (logger.level, list(logger.handlers), logger.propagate) == before


def _train(work, out: Path, *extra: str, model="llama", data="lm.csv") -> int:
    return main(["train", "--model", str(work[model]), "--data", str(work["root"] / data), "--output", str(out),
                 "--batch-size", "4", "--lr", "1e-2", "--no-progress", *extra])


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("odelta-fast: error: "), err
    return lines[0]


def _outputs(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.fixture(scope="module")
def trained_llama(work, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "llama"
    assert _train(work, out, "--targets", "attn.q", "attn.v", "ff.w1", "-p", "lora_r=4",
                  "--max-steps", "4", "--save-every", "2", "--log-every", "2") == 0
    return out


# ---------------------------------------------------------------------- train
def test_train_causal_lm_csv_writes_checkpoints_and_log(work, trained_llama, capsys):
    assert sorted(p.name for p in trained_llama.iterdir()) == [
        "checkpoint-2", "final", "train_config.yaml", "train_log.jsonl"]
    state = json.loads((trained_llama / "final" / "training.json").read_text())
    assert state["step"] == 4 and state["task"] == "causal-lm" and state["model_class"] == "AutoModelForCausalLM"
    log = [json.loads(line) for line in (trained_llama / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4] and all(r["loss"] > 0 for r in log)

    from transformers import AutoModelForCausalLM

    for name in ("checkpoint-2", "final"):
        model = AutoModelForCausalLM.from_pretrained(str(work["llama"]))
        delta = AutoDeltaModel.from_finetuned(str(trained_llama / name), model)
        assert delta.lora_r == 4 and len(delta.slots) == 6
        # lr 1e-2 for a few steps moves B away from its zero init: the checkpoint holds training.
        assert any(p.abs().max() > 0 for n, p in delta.named_parameters() if n.endswith("lora_B"))


def test_train_classification_jsonl_trains_and_saves_the_head(work, tmp_path, capsys):
    out = tmp_path / "bert"
    assert _train(work, out, "--method", "lora", "--targets", "attn.q", "attn.v", "--max-steps", "3",
                  model="bert", data="cls.jsonl") == 0
    stdout = capsys.readouterr().out
    assert "trainable params:" in stdout and "classification" in stdout
    state = json.loads((out / "final" / "training.json").read_text())
    assert state["num_labels"] == 2 and state["model_class"] == "AutoModelForSequenceClassification"
    config = json.loads((out / "final" / "config.json").read_text())
    assert "classifier" in config["unfrozen_modules"]

    from safetensors.torch import load_file

    tensors = load_file(str(out / "final" / config["weights_file"]))
    assert "classifier.weight" in tensors  # the new head trains and is saved with the delta


def test_train_csv_with_string_labels_and_epochs(work, tmp_path):
    out = tmp_path / "csv"
    assert _train(work, out, "--method", "bitfit", "--epochs", "1", model="bert", data="cls.csv") == 0
    state = json.loads((out / "final" / "training.json").read_text())
    assert state["id2label"] == {"0": "neg", "1": "pos"}
    assert state["step"] == 6  # 24 rows / batch 4, one epoch


def test_train_plain_text_jsonl_with_adapter(work, tmp_path):
    out = tmp_path / "adapter"
    assert _train(work, out, "--method", "adapter", "-p", "bottleneck_dim=4", "--max-steps", "2",
                  model="gpt2", data="lm.jsonl") == 0
    assert json.loads((out / "final" / "config.json").read_text())["delta_type"] == "adapter"


def test_yaml_config_with_dotted_overrides(work, tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text(
        f"model: {work['llama']}\n"
        f"data:\n  path: {work['root'] / 'lm.csv'}\n  max_length: 16\n"
        "method:\n  name: lora\n  targets: [attn.q, attn.v]\n  lora_r: 2\n"
        f"train:\n  output_dir: {tmp_path / 'out'}\n  lr: 1e-3\n  max_steps: 2\n  progress: false\n"
    )
    assert main(["train", "--config", str(config), "--set", "method.lora_r=3", "train.lr=2e-2",
                 "--print-config"]) == 0
    import yaml

    printed = yaml.safe_load(capsys.readouterr().out)
    # YAML reads 1e-3 as a string; the schema makes it a float; --set wins over the file.
    assert printed["train"]["lr"] == pytest.approx(2e-2) and printed["method"]["lora_r"] == 3
    assert printed["data"]["max_length"] == 16 and printed["method"]["targets"] == ["attn.q", "attn.v"]

    assert main(["train", "--config", str(config), "--set", "method.lora_r=3", "--max-steps", "1"]) == 0
    saved = json.loads((tmp_path / "out" / "final" / "config.json").read_text())
    assert saved["lora_r"] == 3 and saved["modified_modules"] == ["attn.q", "attn.v"]
    assert json.loads((tmp_path / "out" / "final" / "training.json").read_text())["step"] == 1  # flag over file


# ---------------------------------------------------------------------- interruption
def _checkpoint_loads(work, path: Path) -> None:
    from transformers import AutoModelForCausalLM

    AutoDeltaModel.from_finetuned(str(path), AutoModelForCausalLM.from_pretrained(str(work["llama"])))


def test_interrupted_training_leaves_the_last_checkpoint_loadable(work, tmp_path, monkeypatch, capsys):
    out = tmp_path / "interrupted"
    real_step, calls = train_cmd._optimizer_step, []

    def step_then_interrupt(optimizer, scheduler):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # Ctrl-C between checkpoint 4 and 6
        real_step(optimizer, scheduler)

    monkeypatch.setattr(train_cmd, "_optimizer_step", step_then_interrupt)
    assert _train(work, out, "--max-steps", "8", "--save-every", "2") == 130
    assert "interrupted at step 4" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-2", "checkpoint-4"]
    assert run_state.latest_checkpoint(out) == out / "checkpoint-4"
    _checkpoint_loads(work, out / "checkpoint-4")


def test_crash_inside_a_checkpoint_write_keeps_the_previous_one(work, tmp_path, monkeypatch):
    from odelta_fast import checkpoint
    from odelta_fast.delta import DeltaBase

    out = tmp_path / "crash"
    real_save, calls = DeltaBase.save_finetuned, []

    def save_then_crash(self, path, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint dies after its weights file is on disk
            checkpoint.save_checkpoint(path, {"partial": True}, {})
            raise OSError("disk full")
        return real_save(self, path, **kwargs)

    monkeypatch.setattr(DeltaBase, "save_finetuned", save_then_crash)
    assert _train(work, out, "--max-steps", "6", "--save-every", "2") == 1
    # Only complete checkpoints are visible; the half-written one left no directory behind.
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-2"]
    _checkpoint_loads(work, out / "checkpoint-2")


def test_killed_process_leaves_every_checkpoint_loadable(work, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "odelta_fast.cli", "train", "--model", str(work["llama"]),
           "--data", str(work["root"] / "lm.csv"), "--output", str(out), "--batch-size", "2",
           "--max-steps", "100000", "--save-every", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (out / "checkpoint-3").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # no handler runs: the worst case, mid-save or mid-step
    finally:
        proc.kill()
        proc.wait()
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(checkpoints) >= 3 and not (out / "final").exists()
    for path in checkpoints[-2:]:
        _checkpoint_loads(work, path)


# ---------------------------------------------------------------------- merge
def test_merge_output_loads_with_from_pretrained_and_matches(work, trained_llama, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert main(["merge", "--model", str(work["llama"]), "--delta", str(trained_llama / "final"),
                 "--output", str(out), "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    assert "max |merged - unmerged| (reloaded" in stdout

    ids = torch.randint(4, 20, (2, 6), generator=torch.Generator().manual_seed(3))
    base = AutoModelForCausalLM.from_pretrained(str(work["llama"])).eval()
    plain = _outputs(base, ids)
    AutoDeltaModel.from_finetuned(str(trained_llama / "final"), base)
    unmerged = _outputs(base, ids)
    merged_model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    merged = _outputs(merged_model, ids)
    assert (unmerged - plain).abs().max() > 1e-4  # the delta changes the outputs...
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)  # ...and the merge keeps that
    assert not any("lora" in name for name, _ in merged_model.named_parameters())
    assert AutoTokenizer.from_pretrained(str(out))("the movie")["input_ids"]


def test_merge_writes_one_block_per_shard(work, tmp_path, monkeypatch):
    """Peak memory: no single safetensors write may hold more than one transformer block."""
    import safetensors.torch

    model_dir = _model_dir(tmp_path, "llama", num_hidden_layers=4)
    run = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(work["root"] / "lm.csv"), "--output", str(run),
                 "--targets", "all-linear", "--max-steps", "1", "--no-progress"]) == 0
    written, real_save = [], safetensors.torch.save_file

    def recording_save(tensors, filename, metadata=None):
        written.append((Path(filename).name, sum(t.numel() * t.element_size() for t in tensors.values()),
                        sorted(tensors)))
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", recording_save)
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(model_dir), "--delta", str(run / "final"), "--output", str(out),
                 "--no-progress"]) == 0
    model, _ = tiny_model("llama", num_hidden_layers=4)
    block_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert len(written) >= 4 + 1
    for name, nbytes, keys in written:
        blocks = {k.split(".")[2] for k in keys if k.startswith("model.layers.")}
        assert len(blocks) <= 1, (name, keys)
        assert nbytes <= max(block_bytes, model.model.embed_tokens.weight.numel() * 4), (name, nbytes)
    assert max(n for _, n, _ in written) < total / 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())


def test_merge_gpt2_conv1d_tied_and_bert_classifier(work, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    for kind, data, cls in (("gpt2", "lm.csv", AutoModelForCausalLM),
                            ("bert", "cls.csv", AutoModelForSequenceClassification)):
        run, out = tmp_path / f"run-{kind}", tmp_path / f"merged-{kind}"
        assert _train(work, run, "--max-steps", "2", model=kind, data=data) == 0
        assert main(["merge", "--model", str(work[kind]), "--delta", str(run / "final"), "--output", str(out),
                     "--no-progress"]) == 0
        merged = cls.from_pretrained(str(out))
        if kind == "bert":
            assert merged.config.id2label == {0: "neg", 1: "pos"}
        else:
            assert merged.lm_head.weight.data_ptr() == merged.transformer.wte.weight.data_ptr()


def test_merge_refuses_adapters_and_bad_paths(work, tmp_path, capsys):
    run = tmp_path / "adapter"
    assert _train(work, run, "--method", "adapter", "--max-steps", "1") == 0
    capsys.readouterr()
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(work["llama"]), "--delta", str(run / "final"), "-o", str(out)]) == 2
    line = _error_line(capsys)
    assert "'adapter' deltas cannot be merged" in line and "from_finetuned" in line
    assert not out.exists()
    assert main(["merge", "--model", str(work["llama"]), "--delta", str(tmp_path / "nope"), "-o", str(out)]) == 2
    assert "--delta" in _error_line(capsys)


# ---------------------------------------------------------------------- inspect / env / bench
def test_inspect_tree_selection_and_near_misses(work, capsys):
    assert main(["inspect", str(work["llama"]), "--spec", "attn.q", "v_proj"]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "0-1 (LlamaDecoderLayer)" in out  # folded tree
    assert "model.layers.1.self_attn.q_proj  (common: block.1.attn.q)" in out
    assert "spec 'v_proj' selects 2 modules" in out

    assert main(["inspect", str(work["llama"]), "--no-tree", "--spec", "attn.qq"]) == 1
    out = capsys.readouterr().out
    assert "selects no module" in out and "closest candidates" in out and "q_proj" in out

    assert main(["inspect", str(work["gpt2"]), "--no-tree", "--method", "lora"]) == 0
    assert "transformer.h.0.attn.c_attn" in capsys.readouterr().out  # fused qkv: LoRA's default there


def test_env_reports_versions_and_backends(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for field in ("Python", "torch", "Triton", "transformers", "peft", "CUDA available", "GPU", "backend eager"):
        assert field in out
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__ and info["backends"]["eager"] == "yes"
    assert info["lora_paths"].startswith("split for every shape")  # the shipped table is empty until a GPU run
    # no GPU here: the persistent path says why it cannot run (or that the interpreter would run it)
    if torch.cuda.is_available():
        assert info["lora_persistent"] == "yes" or info["lora_persistent"].startswith("no: "), info["lora_persistent"]
    else:
        assert info["lora_persistent"] in ("no CUDA device", "interpreter mode", "no (triton not installed)")


def test_bench_lists_and_rejects_unknown(capsys):
    assert main(["bench", "--list"]) == 0
    assert "cpu_train_step" in capsys.readouterr().out
    assert main(["bench", "no_such_bench"]) == 2
    assert "cpu_train_step" in _error_line(capsys)


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("case", [
    "missing model", "row without text", "csv row without label", "unknown method", "spec selects nothing",
    "bad yaml key", "bad yaml value", "bad --set", "unknown hyper-parameter", "invalid json",
])
def test_bad_input_is_one_clear_line(work, tmp_path, capsys, case):
    root = tmp_path
    (root / "no_text.jsonl").write_text('{"text": "the movie", "label": 1}\n\n{"sentence": "bad", "label": 0}\n')
    (root / "no_label.csv").write_text("text,label\nthe movie,1\nthe meal,\n")
    (root / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    (root / "bad_key.yaml").write_text("train:\n  lr: 1e-3\n  max_step: 2\n")
    (root / "bad_value.yaml").write_text("train:\n  batch_size: many\n")
    base = ["train", "--model", str(work["bert"]), "--data", str(work["root"] / "cls.jsonl"), "-o", str(root / "o")]
    argv, expected = {
        "missing model": (["train", "--model", str(root / "none"), "--data", "x.jsonl", "-o", "o"],
                          ["--model", "no such directory"]),
        "row without text": (base[:3] + ["--data", str(root / "no_text.jsonl")] + base[5:],
                             ["no_text.jsonl:3:", "no 'text' column", "'sentence'"]),
        "csv row without label": (base[:3] + ["--data", str(root / "no_label.csv")] + base[5:],
                                  ["no_label.csv:3:", "'label'"]),
        "unknown method": (base + ["--method", "lorra"], ["--method lorra", "unknown method", "lora", "bitfit"]),
        "spec selects nothing": (base + ["--targets", "attn.qq"],
                                 ["--targets", "'attn.qq'", "closest candidates", "attention.self.query"]),
        "bad yaml key": (["train", "--config", str(root / "bad_key.yaml")],
                         ["bad_key.yaml:3:", "'train.max_step'", "max_steps"]),
        "bad yaml value": (["train", "--config", str(root / "bad_value.yaml")],
                           ["bad_value.yaml:2:", "train.batch_size", "integer"]),
        "bad --set": (base + ["--set", "train.lr=fast"], ["--set train.lr=fast", "not a number"]),
        "unknown hyper-parameter": (base + ["-p", "lora_rank=4"], ["lora_rank", "lora_r"]),
        "invalid json": (base[:3] + ["--data", str(root / "broken.jsonl")] + base[5:],
                         ["broken.jsonl:2:", "not valid JSON"]),
    }[case]
    assert main(argv) == 2
    line = _error_line(capsys)
    for fragment in expected:
        assert fragment in line, (fragment, line)


def test_debug_verbosity_shows_the_traceback(work, monkeypatch):
    from odelta_fast.commands import CLIError

    monkeypatch.setenv("ODELTA_VERBOSITY", "debug")
    with pytest.raises(CLIError, match="no such directory"):
        main(["inspect", str(work["root"] / "none")])


def test_bad_verbosity_warns_and_falls_back(monkeypatch, capsys):
    """A typo in a logging variable must not stop every command (it did, even ``env``)."""
    monkeypatch.setenv("ODELTA_VERBOSITY", "loud")
    assert main(["env"]) == 0
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if "ODELTA_VERBOSITY" in line]
    assert warning == ["odelta-fast: warning: ODELTA_VERBOSITY='loud' is not a verbosity; expected one of "
                       "debug, info, warning, error, critical; using warning"]
    assert "odelta_fast" in captured.out  # env printed its report


def test_logging_is_quiet_by_default_and_follows_odelta_verbosity(work, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("ODELTA_VERBOSITY", raising=False)
    assert _train(work, tmp_path / "quiet", "--max-steps", "2", "--log-every", "1") == 0
    assert "loss" not in capsys.readouterr().err
    monkeypatch.setenv("ODELTA_VERBOSITY", "info")
    assert _train(work, tmp_path / "loud", "--max-steps", "2", "--log-every", "1") == 0
    err = capsys.readouterr().err
    assert "[odelta_fast.cli.train] INFO: step 2/2 epoch 0 loss" in err


def test_real_executable_prints_one_line_and_exits_2(tmp_path):
    env = dict(os.environ)
    env.pop("ODELTA_VERBOSITY", None)
    result = subprocess.run([sys.executable, "-m", "odelta_fast.cli", "train", "--model", str(tmp_path / "none"),
                             "--data", "d.jsonl", "-o", str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"odelta-fast: error: --model {tmp_path / 'none'}: no such directory; expected a local Hugging Face "
        "model directory"]


def test_resume_continues_to_the_same_delta_as_an_uninterrupted_run(work, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    def final_tensors(out):
        (weights,) = (out / "final").glob("delta-*.safetensors")
        return load_file(str(weights))

    whole = tmp_path / "whole"
    assert _train(work, whole, "--max-steps", "7", "--save-every", "2", "--warmup-steps", "3") == 0

    broken = tmp_path / "broken"
    real_step, calls = train_cmd._optimizer_step, []

    def step_then_interrupt(optimizer, scheduler):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        real_step(optimizer, scheduler)

    monkeypatch.setattr(train_cmd, "_optimizer_step", step_then_interrupt)
    assert _train(work, broken, "--max-steps", "7", "--save-every", "2", "--warmup-steps", "3") == 130
    monkeypatch.undo()
    assert run_state.latest_checkpoint(broken) == broken / "checkpoint-4"
    capsys.readouterr()
    assert _train(work, broken, "--max-steps", "7", "--save-every", "2", "--warmup-steps", "3", "--resume") == 0
    assert "resuming from" in capsys.readouterr().out
    expected, got = final_tensors(whole), final_tensors(broken)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.allclose(got[key], expected[key], atol=1e-6), key
    steps = [json.loads(line)["step"] for line in (broken / "train_log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 7

    # nothing to resume: a finished run, or an empty directory
    assert _train(work, broken, "--max-steps", "7", "--resume") == 2
    assert "already finished" in _error_line(capsys)
    assert _train(work, tmp_path / "empty", "--max-steps", "7", "--resume") == 2
    assert "no complete checkpoint" in _error_line(capsys)


# ---------------------------------------------------------------------- nothing silently wrong
def test_encoder_without_labels_is_not_trained_as_a_causal_lm(work, tmp_path, capsys):
    out = tmp_path / "bert-lm"
    assert _train(work, out, "--max-steps", "1", model="bert", data="lm.csv") == 2
    line = _error_line(capsys)
    for fragment in ("no 'label' column (found 'text')", "BertConfig is an encoder-only model", "--label-column",
                     "--task"):
        assert fragment in line, (fragment, line)
    assert not out.exists()  # nothing written for a run that never started


def test_an_earlier_run_is_refused_without_overwrite_or_resume(work, tmp_path, capsys):
    out = tmp_path / "twice"
    assert _train(work, out, "--max-steps", "4", "--save-every", "2") == 0
    assert _train(work, out, "--max-steps", "1") == 2
    line = _error_line(capsys)
    assert "holds an earlier run (checkpoint-2" in line and "--overwrite" in line and "--resume" in line
    assert _train(work, out, "--max-steps", "1", "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["final", "train_config.yaml", "train_log.jsonl"]
    assert json.loads((out / "final" / "training.json").read_text())["step"] == 1


def test_a_failed_run_leaves_nothing_behind(work, tmp_path, monkeypatch):
    out = tmp_path / "failed"

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(train_cmd, "_optimizer_step", boom)
    assert _train(work, out, "--max-steps", "2") == 1
    assert not out.exists()


def _corrupt(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_truncated_delta_and_model_files_are_named(work, trained_llama, tmp_path, capsys):
    import shutil

    delta = tmp_path / "delta"
    shutil.copytree(trained_llama / "final", delta)
    weights = next(delta.glob("delta-*.safetensors"))
    _corrupt(weights)
    assert main(["merge", "--model", str(work["llama"]), "--delta", str(delta), "-o", str(tmp_path / "m")]) == 2
    line = _error_line(capsys)
    assert weights.name in line and "truncated or corrupt" in line

    model = tmp_path / "model"
    shutil.copytree(work["llama"], model)
    _corrupt(model / "model.safetensors")
    for argv in (["inspect", str(model), "--no-tree"],
                 ["merge", "--model", str(model), "--delta", str(trained_llama / "final"), "-o", str(tmp_path / "m")],
                 ["train", "--model", str(model), "--data", str(work["root"] / "lm.csv"), "-o", str(tmp_path / "t")]):
        assert main(argv) == 2, argv
        line = _error_line(capsys)
        assert "model.safetensors: not a readable safetensors file" in line and "truncated" in line, line


@pytest.mark.parametrize("command", ["train", "merge", "inspect"])
def test_a_garbage_model_config_is_blamed_on_the_config(work, trained_llama, tmp_path, capsys, command):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(work["llama"], model)
    (model / "config.json").write_text("{ this is not json")
    argv = {
        "train": ["train", "--model", str(model), "--data", str(work["root"] / "lm.csv"), "-o", str(tmp_path / "t")],
        "merge": ["merge", "--model", str(model), "--delta", str(trained_llama / "final"), "-o", str(tmp_path / "m")],
        "inspect": ["inspect", str(model)],
    }[command]
    assert main(argv) == 2
    line = _error_line(capsys)
    assert "config.json: the model config is not valid JSON" in line, line
    assert "tokenizer" not in line and "--model-class" not in line


def test_merging_onto_another_architecture_names_the_one_it_was_trained_on(work, tmp_path, capsys):
    run = tmp_path / "gpt2-run"
    assert _train(work, run, "--max-steps", "1", "--targets", "ff.w1", model="gpt2") == 0
    assert main(["merge", "--model", str(work["llama"]), "--delta", str(run / "final"), "-o", str(tmp_path / "m"),
                 "--model-class", "AutoModelForCausalLM"]) == 2
    assert "trained on a gpt2 model" in _error_line(capsys)


def test_files_written_by_the_commands_honour_the_umask(work, tmp_path):
    out, merged = tmp_path / "run", tmp_path / "merged"
    old = os.umask(0o022)
    try:
        assert _train(work, out, "--max-steps", "2", "--save-every", "1") == 0
        assert main(["merge", "--model", str(work["llama"]), "--delta", str(out / "final"), "-o", str(merged),
                     "--no-progress"]) == 0
    finally:
        os.umask(old)
    files = [p for p in list(out.rglob("*")) + list(merged.rglob("*")) if p.is_file()]
    assert len(files) > 8
    modes = {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777) for p in files}
    assert {k: v for k, v in modes.items() if v != "0o644"} == {}
