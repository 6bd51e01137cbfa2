"""`python -m bench overhead`: the JSON it writes, the scaling sweep, bad options, and the hook-based ISOPO
baseline against the efficient engine (float64, same overlap samples)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

import pytest
import torch
from isopo_fixtures import make_batch, masked_sum, tiny_qwen3, token_log_probs

from algorithms.isopo import Isopo, IsopoConfig
from bench.__main__ import main
from bench.hooks_baseline import HooksIsopo
from bench.overhead import MODES, SCALING_MODES, Mode, Options, _median_ci, build
from bench.overhead import make_batch as overhead_batch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny", "--batch", "2", "--seq-len", "32", "--repeats", "2", "--warmup", "1", "--threads", "1"]
CONFIG_KEYS = {"model", "batch", "seq_len", "dtype", "autocast", "threads", "malloc", "lm_head", "peak_memory",
               "repeats", "warmup", "num_samples", "chunk_mib", "compile", "strategy", "cuda_graphs", "triton_kernels",
               "optimizer",
               "torch_version"}
RESULT_KEYS = {"median_s", "min_s", "max_s", "ratio_vs_reinforce", "paired_ratio_median", "paired_ratio_ci95",
               "host_median_s", "peak_mib",
               "peak_ratio_vs_reinforce", "gflop", "flop_ratio_vs_reinforce"}


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def check_results(results: dict, modes) -> None:
    assert list(results) == list(modes)
    for mode, r in results.items():
        assert set(r) == RESULT_KEYS, mode
        assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"], mode
        assert r["ratio_vs_reinforce"] > 0 and r["peak_mib"] > 0 and r["peak_ratio_vs_reinforce"] > 0, mode
        assert 0 < r["host_median_s"] <= r["median_s"], mode  # issuing the step cannot outlast the step
        ci = r["paired_ratio_ci95"]
        assert ci is None or ci[0] <= r["paired_ratio_median"] <= ci[1], mode
        # ISOPO's statistics only add matmuls to REINFORCE's (its G replaces the weight gradient at equal cost).
        assert r["gflop"] > 0 and r["flop_ratio_vs_reinforce"] >= 1.0, mode
    assert results["reinforce"]["ratio_vs_reinforce"] == 1.0 and results["reinforce"]["paired_ratio_median"] == 1.0
    assert results["reinforce"]["peak_ratio_vs_reinforce"] == 1.0
    assert results["reinforce"]["flop_ratio_vs_reinforce"] == 1.0


def test_paired_ratio_ci_is_a_json_pair_or_none():
    ratios = [1.0 + 0.01 * i for i in (3, 9, 1, 7, 5, 0, 8, 2, 6, 4, 10, 14, 12, 11, 13)]
    ci = _median_ci(ratios)
    assert ci == [pytest.approx(1.03), pytest.approx(1.11)] and json.loads(json.dumps(ci)) == ci
    assert _median_ci(ratios[:5]) is None


def test_cli_writes_json_of_the_exact_schema_with_every_mode(tmp_path):
    out = tmp_path / "deep" / "folder" / "tiny.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "bench", "overhead", *TINY, "--json", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert list(doc) == ["device", "date", "command", "config", "results"]
    assert "cores" in doc["device"]
    datetime.fromisoformat(doc["date"])
    assert doc["command"].startswith("python -m bench overhead --model tiny")
    assert set(doc["config"]) == CONFIG_KEYS
    assert doc["config"]["batch"] == 2 and doc["config"]["seq_len"] == 32 and doc["config"]["threads"] == 1
    assert doc["config"]["optimizer"] is None and doc["config"]["autocast"] == "none"
    assert doc["config"]["malloc"] == "retain" and "heap retain" in proc.stdout
    assert doc["config"]["lm_head"] == "all" and "LM head on every position" in proc.stdout
    assert doc["config"]["cuda_graphs"] is False  # the default is on for CUDA only
    assert doc["config"]["triton_kernels"] is True
    check_results(doc["results"], MODES)
    # The table on stdout names every mode; no temporary file is left behind.
    assert all(mode in proc.stdout for mode in MODES)
    assert [p.name for p in out.parent.iterdir()] == ["tiny.json"]


def test_graphs_default_on_for_cuda_with_two_warmup_rounds_and_off_for_cpu_or_compile(monkeypatch):
    """``IsopoConfig.cuda_graphs``' default, resolved once so that the JSON records what ran: CUDA graphs on
    CUDA unless compiling, with a second warm-up round for the capture after the first EMA update."""
    from bench.overhead import validate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda = validate(Options(device="cuda"))
    assert cuda.cuda_graphs is True and cuda.warmup == 2
    assert validate(Options(device="cuda", warmup=1)).warmup == 1  # an explicit count stands
    eager = validate(Options(device="cuda", cuda_graphs=False))
    assert eager.cuda_graphs is False and eager.warmup == 1
    compiled = validate(Options(device="cuda", compile=True))
    assert compiled.cuda_graphs is False and compiled.warmup == 1
    cpu = validate(Options(device="cpu"))
    assert cpu.cuda_graphs is False and cpu.warmup == 1
    assert validate(Options(device="cpu", cuda_graphs=False)).cuda_graphs is False  # --no-cuda-graphs on a CPU


def test_overhead_needs_neither_the_sweep_stack_nor_verl(tmp_path):
    """A lent GPU host has torch and transformers but not OmegaConf, MLflow or verl: the overhead command
    (and its one-line errors) must run without them."""
    blocked = ("omegaconf", "mlflow", "verl", "antlr4")
    script = (
        "import runpy, sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None  # import fails as if not installed\n"
        "sys.argv = ['bench', *sys.argv[1:]]\n"
        "runpy.run_module('bench', run_name='__main__')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "o.json"
    ok = subprocess.run([sys.executable, "-c", script, "overhead", *TINY, "--modes", "isopo_ni:paper",
                         "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert set(json.loads(out.read_text())["results"]) == {"reinforce", "isopo_ni:paper"}
    bad = subprocess.run([sys.executable, "-c", script, "overhead", "--model", "nope"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: unknown model preset 'nope'; valid presets: tiny, small, qwen3-0.6b, deep-narrow"]


def test_scaling_sweep_with_short_lists_and_optimizer(tmp_path, capsys, restore_threads):
    out = tmp_path / "scaling.json"
    args = ["overhead", "--model", "tiny", "--batch", "2", "--seq-len", "16", "--repeats", "1", "--warmup", "0",
            "--threads", "1", "--scaling", "--scaling-T", "16,32", "--scaling-B", "2,3", "--optimizer",
            "--malloc", "system", "--json", str(out)]  # in-process: leave pytest's own heap policy alone
    assert main(args) == 0
    doc = json.loads(out.read_text())
    assert set(doc) >= {"device", "date", "command", "config", "points", "results"}
    assert CONFIG_KEYS <= set(doc["config"]) and doc["config"]["optimizer"] == "adamw"
    # (2, 16) is on both sweeps and is measured once.
    assert [(p["batch"], p["seq_len"]) for p in doc["points"]] == [(2, 16), (2, 32), (3, 16)]
    for point in doc["points"]:
        check_results(point["results"], SCALING_MODES)
    assert doc["results"] == doc["points"][0]["results"]  # readable by analysis.load_overhead
    printed = capsys.readouterr().out
    assert "T sweep at B=2" in printed and "B sweep at T=16" in printed


def test_a_point_out_of_device_memory_is_recorded_and_the_sweep_goes_on(tmp_path, capsys, monkeypatch):
    import bench.overhead as overhead

    real = overhead.measure

    def measure(modes, batch, *args, **kwargs):
        if batch.input_ids.shape[1] == 32:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.64 GiB.")
        return real(modes, batch, *args, **kwargs)

    monkeypatch.setattr(overhead, "measure", measure)
    out = tmp_path / "scaling.json"
    args = ["overhead", *TINY[:2], "--batch", "2", "--seq-len", "16", "--repeats", "1", "--warmup", "0",
            "--scaling", "--scaling-T", "16,32", "--scaling-B", "3", "--malloc", "system", "--json", str(out)]
    assert main(args) == 0
    doc = json.loads(out.read_text())
    assert [(p["batch"], p["seq_len"]) for p in doc["points"]] == [(2, 16), (3, 16)]
    assert doc["failed_points"] == [{"batch": 2, "seq_len": 32, "error": "out of memory"}]
    assert "B=2 T=32 ran out of cpu memory" in capsys.readouterr().err

    # A single measurement that runs out of memory: one line naming the shape, exit 1.
    single = ["overhead", *TINY[:2], "--batch", "2", "--seq-len", "32", "--json", str(tmp_path / "s.json")]
    assert main(single) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "ran out of memory at B=2, T=32" in lines[0] and "smaller --batch" in lines[0]


def test_profile_writes_the_busiest_operators_of_one_step_per_mode(tmp_path, capsys, restore_threads):
    out, prof = tmp_path / "p.json", tmp_path / "prof" / "steps.txt"
    args = ["overhead", *TINY, "--modes", "isopo_ni:paper", "--malloc", "system", "--json", str(out),
            "--profile", str(prof)]
    assert main(args) == 0
    text = prof.read_text()
    heads = [line for line in text.splitlines() if line.startswith("== ")]
    assert [h.split(": host")[0] for h in heads] == ["== reinforce", "== isopo_ni:paper"]
    ops = {h.split(": host")[0]: int(h.split(", ")[-2].split()[0]) for h in heads}
    assert ops["== isopo_ni:paper"] > ops["== reinforce"] > 0  # ISOPO's statistics are extra operators
    assert all(h.endswith(", 0 kernel launches") for h in heads)  # none on a CPU
    assert "IsopoLinearFunctionBackward" in text.split("== isopo_ni:paper")[1]
    assert "IsopoLinearFunctionBackward" not in text.split("== isopo_ni:paper")[0]
    assert text.count("by input shapes, host time:") == 2
    by_shape = text.split("== isopo_ni:paper")[1].split("by input shapes, host time:")[1]
    # Which (operator, shapes) pairs are the busiest follows the timing (ISOPO's per-sequence bmm was among
    # them in most runs, not all); that shapes are listed, with the batch of B = 2 in front, does not.
    assert "[[2, " in by_shape and "aten::" in by_shape
    assert text.count("GPU idle: no device activity") == 2  # the idle report needs a CUDA timeline
    assert main([*args, "--scaling"]) == 2
    assert "--profile profiles a single measurement" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--model", "huge"], "unknown model preset 'huge'"),
        (["--modes", "reinforce,isopo_fast"], "unknown mode 'isopo_fast'"),
        (["--batch", "0"], "--batch must be a positive integer"),
        (["--batch", "-4"], "--batch must be a positive integer"),
        (["--seq-len", "0"], "--seq-len must be at least 2"),
        (["--batch", "two"], "invalid int value: 'two'"),
        (["--dtype", "float8"], "unknown dtype 'float8'"),
        (["--repeats", "0"], "--repeats must be a positive integer"),
        (["--scaling", "--scaling-T", "64,x"], "--scaling-T must be a comma-separated list"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--malloc", "jemalloc"], "unknown --malloc 'jemalloc'"),
        (["--lm-head", "prompt"], "unknown --lm-head 'prompt'"),
        (["--chunk-mib", "0"], "--chunk-mib must be a positive integer"),
        (["--strategy", "fastest"], "unknown --strategy 'fastest'; valid: auto, instantiate, gram"),
        (["--cuda-graphs"], "--cuda-graphs needs --device cuda"),
        (["--modes", "isopo_int+fast"], "mode 'isopo_int+fast': unknown switch +fast"),
        (["--modes", "reinforce+triton"], "the + switches apply to isopo_ni:* and isopo_int only"),
        (["--modes", "isopo_ni_hooks+eager"], "the + switches apply to isopo_ni:* and isopo_int only"),
        (["--modes", "isopo_int+graphs"], "+graphs needs --device cuda"),
        (["--modes", "isopo_nope+triton"], "unknown mode 'isopo_nope'"),
    ],
)
def test_bad_options_give_one_clear_error_line_and_exit_2(args, fragment, capsys):
    try:
        rc = main(["overhead", *args])
    except SystemExit as e:  # argparse's own checks (types, unknown flags) exit from inside parse_args
        rc = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_clear_error(capsys):
    assert main(["overhead", "--device", "cuda", "--model", "tiny"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "CUDA is not available" in lines[0]


def test_every_mode_takes_the_same_gradient_with_the_lm_head_on_the_response_columns_only():
    """--lm-head response skips the LM head over the prompt, where the loss has no weight: every mode's step
    must give exactly the gradients of the full-width step (ISOPO through a view that drops the overlap
    samples it does not show, the hook baseline through its column mapping)."""
    model = tiny_qwen3(seed=1, tie=False)
    vocab = model.config.vocab_size
    full, sliced = overhead_batch(3, 16, vocab, "cpu"), overhead_batch(3, 16, vocab, "cpu", lm_head="response")
    assert sliced.first == 7 and sliced.free_weight.shape == (3, 9) and len(sliced.views) == 1
    for name in MODES:
        grads = []
        for batch in (full, sliced):
            mode = Mode(name, model, None, nullcontext, num_samples=20)
            mode.begin()
            mode.step(batch)
            mode.end()
            grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        for param in grads[0]:
            expected = grads[0][param]
            scale = max(float(expected.abs().max()), 1.0)
            torch.testing.assert_close(grads[1][param], expected, rtol=1e-10, atol=1e-12 * scale,
                                       msg=lambda m, name=name, param=param: f"{name} {param}: {m}")


def test_chunk_size_reaches_the_engine_and_leaves_the_gradient_unchanged():
    """--chunk-mib only decides how the LM head's per-sequence gradients are held: a chunk far below one
    layer's block (output chunks, then the weight gradient as one more matmul) gives the same gradients."""
    model = tiny_qwen3(seed=2, tie=False)
    batch = overhead_batch(3, 16, model.config.vocab_size, "cpu")
    for name in ("isopo_ni:paper", "isopo_int"):
        grads = []
        for chunk_bytes in (2**10, 2**30):
            mode = Mode(name, model, None, nullcontext, num_samples=20, chunk_bytes=chunk_bytes)
            assert mode.engine.cfg.chunk_bytes == chunk_bytes
            mode.begin()
            mode.step(batch)
            mode.end()
            grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        for param, expected in grads[1].items():
            scale = max(float(expected.abs().max()), 1.0)
            torch.testing.assert_close(grads[0][param], expected, rtol=1e-10, atol=1e-12 * scale,
                                       msg=lambda m, name=name, param=param: f"{name} {param}: {m}")


def test_deep_narrow_preset_and_strategy_reach_the_engine(tmp_path, restore_threads):
    """The host-cost proxy: Qwen3-0.6B's 28 blocks at width 64, with the statistics route forced."""
    out = tmp_path / "dn.json"
    args = ["overhead", "--model", "deep-narrow", "--batch", "2", "--seq-len", "8", "--num-samples", "4",
            "--strategy", "instantiate", "--repeats", "1", "--warmup", "0", "--threads", "1",
            "--modes", "isopo_int", "--malloc", "system", "--json", str(out)]
    assert main(args) == 0
    doc = json.loads(out.read_text())
    assert doc["config"]["model"] == "deep-narrow" and doc["config"]["strategy"] == "instantiate"
    model, _ = build(Options(model="deep-narrow"), 8)
    assert model.config.num_hidden_layers == 28 and model.config.hidden_size == 64
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 28 * 7 + 1
    mode = Mode("isopo_ni:paper", model, None, nullcontext, num_samples=4, strategy="gram")
    assert mode.engine.cfg.strategy == "gram"


def test_graph_tails_leave_the_layers_on_a_view_eager_and_the_gradient_unchanged():
    """--lm-head response: the LM head sees a view whose sample size varies per micro-batch, so it stays
    eager (no capture per size); the main layout's layers take the static buffers (capture=False on a CPU)."""
    model = tiny_qwen3(seed=2, tie=False)
    vocab = model.config.vocab_size
    batch = overhead_batch(3, 16, vocab, "cpu", lm_head="response")
    for name in ("isopo_ni:paper", "isopo_int"):
        grads = []
        for graphs in (False, True):
            mode = Mode(name, model, None, nullcontext, num_samples=20, strategy="instantiate", cuda_graphs=graphs)
            if graphs:
                mode.engine.graphs.capture = False
            for _ in range(2):  # the second step reads the EMAs of the first
                mode.begin()
                mode.step(batch)
                mode.end()
            grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        tails = mode.engine.graphs._graphs
        assert tails and all(shape[2] != vocab for shape, _ in tails)  # shape: (B, in, out, ...): no LM head
        for param, expected in grads[0].items():
            torch.testing.assert_close(grads[1][param], expected, rtol=1e-6, atol=1e-9,
                                       msg=lambda m, name=name, param=param: f"{name} {param}: {m}")


# -- the hook-based baseline equals the efficient engine ---------------------------------------------------
SPECS = [((3, 5, 2, 4), (4, 2, 6, 3)), ((2, 4, 3), (5, 3, 2))]  # two padded micro-batches


def _two_steps(model, engine, batches, n_tok):
    """Two optimizer steps (no update) of two micro-batches each: accumulation and the EMA both matter."""
    out = []
    with engine.installed():
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            for b in batches:
                with engine.micro_batch(b["seq_ids"], b["advantages"]):
                    logp = token_log_probs(model, b["input_ids"], b["attention_mask"])
                    (-masked_sum(logp, b["response_mask"]) / n_tok).backward()
            engine.end_step()
            out.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    return out


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize(
    "cfg",
    [
        IsopoConfig(setting="paper", num_samples=9, seed=3),  # K below the token count: a real subsample
        IsopoConfig(setting="paper"),  # K = 250: every token
        IsopoConfig(setting="rel_overlap", c_n=0.5, c_o=0.3, c_r=0.2, reg_form="keep_small_invariant",
                    num_samples=7),
        IsopoConfig(variant="interacting", setting=None, c_lambda=1.0),
        IsopoConfig(variant="interacting", setting=None, c_lambda=0.05),
    ],
    ids=["ni-paper-K9", "ni-paper-K250", "ni-rel-overlap-reg", "int", "int-small-lambda"],
)
def test_hooks_baseline_matches_efficient_isopo_on_linear_weights(tie, cfg):
    model = tiny_qwen3(tie=tie)
    batches = [make_batch(10 + j, p, r) for j, (p, r) in enumerate(SPECS)]
    n_tok = float(sum(b["response_mask"].sum() for b in batches))
    efficient = _two_steps(model, Isopo(model, cfg), batches, n_tok)
    hooks = _two_steps(model, HooksIsopo(model, cfg), batches, n_tok)

    shared = {id(model.get_input_embeddings().weight)}
    linear = [n + ".weight" for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and id(m.weight) not in shared]
    assert len(linear) == 14 + (0 if tie else 1)
    for step in range(2):
        for name in linear:
            e, h = efficient[step][name], hooks[step][name]
            err = float((h - e).norm() / e.norm())
            assert err < 1e-10, f"step {step}, {name}: relative error {err:.2e}"

    if not tie:
        # The reference code's quirk: non-Linear parameters keep the advantage-free gradient.
        model.zero_grad(set_to_none=True)
        for b in batches:
            logp = token_log_probs(model, b["input_ids"], b["attention_mask"])
            (-masked_sum(logp, b["response_mask"]) / n_tok).backward()
        for name, p in model.named_parameters():
            if name not in linear:
                torch.testing.assert_close(hooks[1][name], p.grad, rtol=1e-12, atol=1e-14)


def test_engine_switches_reach_the_isopo_config():
    """--triton-kernels and --no-cuda-graphs (or their defaults) are what the ISOPO modes' engines run."""
    model = tiny_qwen3()
    for kernels_on in (True, False):
        for graphs in (True, False):
            mode = Mode("isopo_int", model, None, nullcontext, num_samples=4, cuda_graphs=graphs,
                        triton_kernels=kernels_on)
            assert mode.engine.cfg.triton_kernels is kernels_on and mode.engine.cfg.cuda_graphs is graphs
            assert (mode.engine.graphs is not None) is graphs


def test_mode_switches_run_both_sides_of_a_switch_in_one_process(tmp_path, monkeypatch):
    """+triton / +eager / +cublas / +graphs / +instantiate / +gram: each mode's engine departs from the run's defaults as its name
    says; the results are keyed by the full names, and a graphed mode anywhere means two warm-up rounds."""
    from bench.overhead import split_mode, validate

    assert split_mode("isopo_int+triton+eager") == ("isopo_int", {"triton_kernels": True, "cuda_graphs": False})
    assert split_mode("isopo_int+formgram") == ("isopo_int", {"kernels.FORM_IMPL": "fused"})
    assert split_mode("isopo_ni:paper+outer+rownorms+fused") == (
        "isopo_ni:paper", {"kernels.GRAM_IMPL": "outer", "kernels.NORMS_IMPL": "kernel",
                           "kernels.OVERLAP_IMPL": "fused"})
    model = tiny_qwen3()
    mode = Mode("isopo_int+triton+eager", model, None, nullcontext, num_samples=4, cuda_graphs=True,
                triton_kernels=False)
    assert mode.engine.cfg.triton_kernels is True and mode.engine.graphs is None
    mode = Mode("isopo_ni:paper+graphs+cublas", model, None, nullcontext, num_samples=4, triton_kernels=True)
    assert mode.engine.cfg.triton_kernels is False and mode.engine.graphs is not None
    assert mode.engine.cfg.strategy == "auto"
    for route in ("instantiate", "gram"):
        assert Mode(f"isopo_ni:paper+{route}", model, None, nullcontext, num_samples=4).engine.cfg.strategy == route
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert validate(Options(device="cuda", cuda_graphs=False, modes=["isopo_int", "isopo_int+graphs"])).warmup == 2
    assert validate(Options(device="cuda", cuda_graphs=False, modes=["isopo_int", "isopo_int+triton"])).warmup == 1
    monkeypatch.undo()
    out = tmp_path / "switches.json"
    assert main(["overhead", *TINY, "--modes", "isopo_int,isopo_int+triton", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["reinforce", "isopo_int", "isopo_int+triton"]
    check_results(results, results)


def test_a_mode_failing_in_its_warm_up_is_recorded_and_the_others_measured(tmp_path, monkeypatch, capsys):
    """A mode whose step raises (a Triton kernel that does not build on the device, say) is left out with a
    warning and listed under failed_modes; the run, its table and its profile go on with the rest."""
    real_step = Mode.step

    def step(self, batch):
        if self.name == "isopo_int+triton":
            raise RuntimeError("no kernel image is available for execution on the device")
        real_step(self, batch)

    monkeypatch.setattr(Mode, "step", step)
    out = tmp_path / "failed.json"
    assert main(["overhead", *TINY, "--modes", "isopo_int,isopo_int+triton", "--json", str(out),
                 "--profile", str(tmp_path / "profile.txt")]) == 0
    doc = json.loads(out.read_text())
    assert list(doc["results"]) == ["reinforce", "isopo_int"]
    assert doc["failed_modes"] == {"isopo_int+triton": "RuntimeError: no kernel image is available for execution "
                                                       "on the device"}
    assert "mode isopo_int+triton failed in its warm-up" in capsys.readouterr().err
    assert "isopo_int+triton" not in (tmp_path / "profile.txt").read_text()


def test_a_kernel_switch_sets_its_kernel_for_the_modes_steps_only(monkeypatch):
    """+outer / +tma / +rownorms: the candidate kernel is the module's setting while that mode steps (where its
    layers launch or capture their kernels) and the default again after; refused off CUDA, where no kernel
    runs and the mode would time the default."""
    from algorithms.isopo import kernels
    from bench import overhead
    from bench.overhead import OverheadError, validate

    seen = []
    real_loss = overhead._loss

    def loss(model, batch, weight):
        seen.append((kernels.GRAM_IMPL, kernels.NORMS_IMPL))
        return real_loss(model, batch, weight)

    monkeypatch.setattr(overhead, "_loss", loss)
    model = tiny_qwen3()
    batch = overhead_batch(2, 16, model.config.vocab_size, "cpu")
    default = (kernels.GRAM_IMPL, kernels.NORMS_IMPL)
    for name, expected in (("isopo_int+outer", ("outer", default[1])), ("isopo_int+tma", ("tma", default[1])),
                           ("isopo_ni:paper+rownorms", (default[0], "kernel")), ("isopo_int", default)):
        mode = Mode(name, model, None, nullcontext, num_samples=4)
        mode.begin()
        try:
            mode.step(batch)
        finally:
            mode.end()
        assert seen[-1] == expected and (kernels.GRAM_IMPL, kernels.NORMS_IMPL) == default
    with pytest.raises(OverheadError, match=r"isopo_int\+outer.*--device cuda only"):
        validate(Options(device="cpu", modes=["reinforce", "isopo_int+outer"]))
    with pytest.raises(OverheadError, match="apply to isopo_ni"):
        validate(Options(device="cpu", modes=["reinforce+outer"]))
