"""Command line: `python -m bench run [--config FILE] [key=value ...]` and `python -m bench overhead ...`."""

from __future__ import annotations

import argparse
import os
import sys


def _known_errors() -> tuple[type[BaseException], ...]:
    from algorithms import UnknownNameError
    from tasks import DataError

    from .config import ConfigError
    from .models import ModelPathError
    from .sweep import SweepFailed

    return (ConfigError, UnknownNameError, DataError, ModelPathError, FileNotFoundError, SweepFailed, ValueError)


def main(argv: list[str] | None = None) -> int:
    # Library chatter (MLflow's INFO lines, weight-loading bars) would drown the sweep's own progress.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = argparse.ArgumentParser(prog="python -m bench", description="isopo-bench: controlled comparisons of "
                                     "policy-gradient algorithms for language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", help="run a sweep (algorithms × seeds) and write its tables and report",
        description="Run a sweep: every algorithm × seed through the same rollout harness. Re-running the same "
        "command resumes it. Overrides are OmegaConf key=value pairs, e.g. run.steps=50 sweep.seeds=[0,1] "
        "sweep.algorithms=[grpo,isopo_ni] run.algorithm.mini_batches=1.",
    )
    # Resolved in _run: `overhead` must not need the sweep's dependencies (OmegaConf, MLflow), so that it also
    # runs on a bare GPU host that has only torch and transformers.
    run.add_argument("--config", default=None, help="YAML config (default: the embedded default)")
    run.add_argument("overrides", nargs="*", help="key=value overrides")
    run.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    overhead = _add_overhead_parser(sub)
    layer_costs = _add_layer_costs_parser(sub)
    args, extra = parser.parse_known_args(argv)
    if extra:
        own = {"overhead": overhead, "layer-costs": layer_costs}.get(args.command)
        if own is None:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")  # what parse_args would say
        own.error(f"unrecognized arguments: {' '.join(extra)}")

    # Outside the handler below: its error types import the sweep's stack, which a bare GPU host lacks.
    if args.command == "overhead":
        return _overhead(args, sys.argv[1:] if argv is None else argv)
    if args.command == "layer-costs":
        return _layer_costs(args)
    try:
        return _run(args)
    except _known_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        return 130


def _run(args) -> int:
    from .config import DEFAULT_CONFIG, load_config, to_yaml
    from .sweep import run_sweep, sweep_dir

    cfg = load_config(args.config or str(DEFAULT_CONFIG), args.overrides)
    if args.print_config:
        print(to_yaml(cfg))
        return 0
    out = run_sweep(cfg)
    print(f"sweep tables: {sweep_dir(cfg)}/metrics.parquet, metrics.csv, runs.csv")
    if cfg.sweep.report:
        from analysis import write_report

        report = write_report(out)
        print(f"report: {report}")
    return 0


def _one_line_error(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _add_layer_costs_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "layer-costs", help="time each piece of one ISOPO layer's backward at a preset's linear shapes",
        description="Time each piece of an ISOPO linear layer's backward (the per-sequence gradients, their "
        "norms, overlaps, NTK, the weighted sum, the B×B solve, the whole layer) beside the ordinary "
        "weight-gradient matmul, at every decoder linear shape of a preset model, and the sum over its "
        "layers. See bench/layer_costs.py.",
    )
    p.error = _one_line_error
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--model", default="small", help="preset: tiny, small, qwen3-0.6b, deep-narrow (default: small)")
    p.add_argument("--batch", type=int, default=8, help="sequences B (default: 8)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence T (default: 1024)")
    p.add_argument("--num-samples", type=int, default=250, help="ISOPO's K overlap samples (default: 250)")
    p.add_argument("--repeats", type=int, default=30, help="timed runs per piece (default: 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (default: 5)")
    return p


def _layer_costs(args) -> int:
    from torch import OutOfMemoryError

    from .layer_costs import Options, run
    from .overhead import OverheadError

    try:
        return run(Options(device=args.device, model=args.model, batch=args.batch, seq_len=args.seq_len,
                           num_samples=args.num_samples, repeats=args.repeats, warmup=args.warmup))
    except OverheadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OutOfMemoryError:
        print(f"error: the {args.device} device ran out of memory at B={args.batch}, T={args.seq_len}; "
              "try a smaller --batch or --seq-len", file=sys.stderr)
        return 1


def _add_overhead_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "overhead", help="time one update step of REINFORCE, ISOPO and the hook-based ISOPO baseline",
        description="Time one update step (forward + backward + gradient transform; AdamW with --optimizer) per "
        "mode on a randomly initialised preset model, modes interleaved after warm-up; print a table and write "
        "JSON (median/min/max seconds, peak memory, ratios to reinforce). See bench/overhead.py for the method.",
    )

    p.error = _one_line_error  # one clear line, like every other bad input of this CLI
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--model", default="small", help="preset: tiny, small, qwen3-0.6b, deep-narrow (0.6B's 28 blocks at width 64: "
                   "a GPU-free proxy for the host's per-operator cost) (default: small)")
    p.add_argument("--batch", type=int, default=8, help="sequences per micro-batch B (default: 8)")
    p.add_argument("--seq-len", type=int, default=1024,
                   help="tokens per sequence T; first half prompt, second half response (default: 1024)")
    p.add_argument("--dtype", default="float32", help="model dtype: float32 or bfloat16 (default: float32)")
    p.add_argument("--autocast", default=None, help="bf16 or none (default: bf16 on cuda, none on cpu)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds, modes interleaved (default: 5)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed rounds first (default: 1; 2 with CUDA graphs, whose first two rounds capture)")
    p.add_argument("--modes", default=None,
                   help="comma-separated subset of reinforce, isopo_ni:paper, isopo_ni:overlap, "
                   "isopo_ni:rel_overlap, isopo_int, isopo_ni_hooks, isopo_int_hooks (default: all; with "
                   "--scaling: reinforce,isopo_ni:paper,isopo_int); reinforce is always added. An ISOPO mode may "
                   "end in +eager, +graphs, +triton, +cublas, +instantiate or +gram, and on CUDA +outer, +tma, +formgram, +rownorms or "
                   "+fused (candidate kernels), to run that side of a switch interleaved with the others, e.g. "
                   "isopo_int,isopo_int+triton")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--num-samples", type=int, default=250, help="ISOPO's K overlap samples (default: 250)")
    p.add_argument("--profile", default=None, metavar="PATH",
                   help="after the measurement, profile one step per mode (torch.profiler; CUDA kernels too on "
                        "cuda) and write the busiest operators per mode to this text file")
    p.add_argument("--compile", action="store_true",
                   help="ISOPO modes run each layer through torch.compile (IsopoConfig.compile; the warm-up "
                        "round compiles)")
    p.add_argument("--triton-kernels", dest="triton_kernels", action=argparse.BooleanOptionalAction, default=True,
                   help="ISOPO modes form the NTK, the weights and the weighted sum with Triton kernels on CUDA "
                        "(IsopoConfig.triton_kernels; default: on; --no-triton-kernels: the torch path)")
    p.add_argument("--cuda-graphs", dest="cuda_graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="ISOPO modes replay each layer's small-tensor tail as one CUDA graph per shape "
                        "(IsopoConfig.cuda_graphs; the warm-up rounds capture; default: on with --device cuda "
                        "unless --compile; --no-cuda-graphs runs every layer eagerly)")
    p.add_argument("--strategy", default="auto",
                   help="ISOPO's per-layer statistics: auto (by FLOP count), instantiate or gram (default: auto)")
    p.add_argument("--chunk-mib", type=int, default=256,
                   help="ISOPO's chunk_bytes in MiB: above it a layer's per-sequence gradients are formed in "
                        "output chunks and its weight gradient is one more matmul (default: 256)")
    p.add_argument("--optimizer", action="store_true", help="include an AdamW step in each timed step")
    p.add_argument("--lm-head", dest="lm_head", default="all",
                   help="all (logits at every position; default) or response (from the first response-predicting "
                   "column on, as the trainer runs it)")
    p.add_argument("--malloc", default="retain",
                   help="CPU heap policy: retain (freed memory stays in the process, as with CUDA's caching "
                   "allocator; default) or system (glibc's defaults)")
    p.add_argument("--json", default=None, help="output file (default: results/overhead/<model>-<device>-B<B>-T<T>"
                   ".json, or results/overhead/scaling-<model>-<device>.json with --scaling; -lmhead-response "
                   "before .json with --lm-head response)")
    p.add_argument("--scaling", action="store_true",
                   help="sweep T (at --batch) and B (at --seq-len) instead of one point")
    p.add_argument("--scaling-T", dest="scaling_t", default=None,
                   help="comma-separated T values of the sweep (default: 256,512,1024,2048,4096)")
    p.add_argument("--scaling-B", dest="scaling_b", default=None,
                   help="comma-separated B values of the sweep (default: 4,8,16,32)")
    return p


def _overhead(args, argv: list[str]) -> int:
    import shlex

    from torch import OutOfMemoryError

    from .overhead import Options, OverheadError, parse_int_list, run

    try:
        opts = Options(
            device=args.device, model=args.model, batch=args.batch, seq_len=args.seq_len, dtype=args.dtype,
            autocast=args.autocast, repeats=args.repeats, warmup=args.warmup,
            modes=[m.strip() for m in args.modes.split(",") if m.strip()] if args.modes is not None else None,
            threads=args.threads, num_samples=args.num_samples, chunk_mib=args.chunk_mib, compile=args.compile,
            strategy=args.strategy, cuda_graphs=args.cuda_graphs, triton_kernels=args.triton_kernels,
            optimizer=args.optimizer,
            json=args.json, scaling=args.scaling,
            scaling_t=parse_int_list(args.scaling_t, "--scaling-T") if args.scaling_t is not None else None,
            scaling_b=parse_int_list(args.scaling_b, "--scaling-B") if args.scaling_b is not None else None,
            malloc=args.malloc, lm_head=args.lm_head, profile=args.profile,
            command=shlex.join(["python", "-m", "bench", *argv]),
        )
        return run(opts)
    except (OverheadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OutOfMemoryError as e:
        first = str(e).splitlines()[0] if str(e) else "out of memory"
        print(f"error: the {args.device} device ran out of memory at B={args.batch}, T={args.seq_len} "
              f"({first}); try a smaller --batch or --seq-len", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
