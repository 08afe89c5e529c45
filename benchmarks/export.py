"""Core ML export cost: wall time and peak RSS of ``mlx-distill export-coreml``, package size vs
the floor, and (when ``.bench-venv/`` holds torch) the same weights exported the torch way.

For each size (``small`` by default; ``0.5b`` with ``--sizes small,0.5b``: ~30 s and ~1.7 GB per
export of ours, 2.5-3.5 min and 7.3 GB per torch export) a checkpoint with random weights
(float32, as our trainer writes them) is saved to a temporary directory, then every export runs
in its own process: wall time from spawn to exit (imports included) and that process's peak RSS
(``os.wait4``'s ``ru_maxrss``). Size: the package's weight blob against the floor of
``mil_weights.weight_floor_bytes`` (params × bytes per weight + scales; goal <= 1.05×).

torch baseline: Apple's published recipe ("On Device Llama 3.1 with Core ML", 2024) on the same
weights: a small torch Llama (below) with the KV cache as registered buffers, ``torch.jit.trace``,
``ct.convert`` with ``ct.StateType`` states, flexible query length and causal-mask inputs
(``RangeDim``), fp16 compute, then ``ct.optimize.coreml.linear_quantize_weights`` (int8 per
channel, symmetric) for int8. It writes one flexible function where we write two (prefill with
enumerated lengths + decode, in one package), so it does less work than ours. It runs in
``.bench-venv/bin/python`` (``make bench-export-torch`` creates it: torch==2.13.0 coremltools==9.0
numpy); torch is never a dependency of the project.

    .venv/bin/python benchmarks/export.py [--sizes small,0.5b] [--precisions fp16,int8]
        [--torch auto|off] [--repeats N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_PYTHON = ROOT / ".bench-venv" / "bin" / "python"
OUR_IMPORTS = "import mlx_distill.cli, converters.export, coremltools"
TORCH_IMPORTS = "import torch, coremltools, coremltools.optimize.coreml"
CHILD_ENV = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="small", help="comma-separated configs/sizes names "
                        "(default small; 0.5b is opt-in: ~10 min with torch, 7.3 GB per torch "
                        "export)")
    parser.add_argument("--precisions", default="fp16,int8")
    parser.add_argument("--torch", choices=("auto", "off"), default="auto",
                        help="auto: also export via torch when .bench-venv/ has torch")
    parser.add_argument("--repeats", type=int, default=1, help="runs per export, alternating "
                        "ours and torch; the table shows the median time and the largest peak")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    # Internal modes, each run in a child process.
    parser.add_argument("--make-checkpoint", nargs=2, metavar=("SIZE", "DIR"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--torch-export", nargs=4, metavar=("CKPT", "OUT", "PRECISION", "CTX"),
                        help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---- measuring a child process ----

def measure(cmd: list[str]) -> dict:
    """Run ``cmd``; its wall time and peak RSS (this child only, via wait4)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=CHILD_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"seconds": round(seconds, 1), "peak_rss_bytes": rss}


def make_checkpoint(size: str, out_dir: str) -> None:
    import mlx_distill  # noqa: F401, I001  (before mlx.core: OpenBLAS on Linux)
    import mlx.core as mx

    from mlx_distill.checkpoint import save_checkpoint
    from mlx_distill.config import load_size_config
    from mlx_distill.model import Model, num_parameters

    mx.random.seed(0)
    model = Model(load_size_config(size).model)
    mx.eval(model.parameters())
    save_checkpoint(model, out_dir)
    print(num_parameters(model))


def summarize(runs: list[dict]) -> dict:
    """Median wall time and the largest peak RSS over repeated runs (each run kept too)."""
    return {"seconds": statistics.median(r["seconds"] for r in runs),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs), "runs": runs}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---- the torch baseline (runs inside .bench-venv) ----

def read_safetensors(path: Path) -> dict:
    """name -> torch tensor, without the safetensors package (header: u64 length + JSON)."""
    import torch

    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = (8 + length + o for o in info["data_offsets"])
        tensors[name] = torch.frombuffer(bytearray(data[start:end]),
                                         dtype=dtypes[info["dtype"]]).reshape(info["shape"])
    return tensors


def torch_export(ckpt: str, out: str, precision: str, max_context: int) -> None:
    import coremltools as ct
    import numpy as np
    import torch
    from torch import nn

    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    weights = {k: v.float() for k, v in read_safetensors(Path(ckpt) / "model.safetensors").items()}
    layers, d = cfg["num_hidden_layers"], cfg["hidden_size"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d_head = cfg.get("head_dim") or d // heads
    eps, theta = cfg["rms_norm_eps"], cfg.get("rope_theta", 10000.0)

    class Llama(nn.Module):
        """Llama forward over ``input_ids`` (1, S) at positions [E - S, E), E = mask width;
        K/V written into, and read from, the registered cache buffers (Apple's recipe)."""

        def __init__(self):
            super().__init__()
            self.params = nn.ParameterDict({k.replace(".", "__"): nn.Parameter(v, False)
                                            for k, v in weights.items()})
            shape = (layers, kv_heads, max_context, d_head)
            self.register_buffer("k_cache", torch.zeros(shape, dtype=torch.float16))
            self.register_buffer("v_cache", torch.zeros(shape, dtype=torch.float16))
            inv_freq = theta ** -(torch.arange(0, d_head, 2, dtype=torch.float32) / d_head)
            self.register_buffer("inv_freq", inv_freq)

        def w(self, key):
            return self.params[key.replace(".", "__")]

        def norm(self, x, key):
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            return x * self.w(key)

        def forward(self, input_ids, causal_mask):
            length, end = input_ids.shape[1], causal_mask.shape[-1]
            begin = end - length
            angles = torch.arange(begin, end, dtype=torch.float32)[:, None] * self.inv_freq
            cos, sin = torch.cos(angles), torch.sin(angles)

            def rope(x):
                x1, x2 = x[..., :d_head // 2], x[..., d_head // 2:]
                return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

            h = self.w("model.embed_tokens.weight")[input_ids[0]][None]
            for i in range(layers):
                p = f"model.layers.{i}"
                x = self.norm(h, f"{p}.input_layernorm.weight")
                q = (x @ self.w(f"{p}.self_attn.q_proj.weight").T).view(1, length, heads, d_head)
                k = (x @ self.w(f"{p}.self_attn.k_proj.weight").T).view(1, length, kv_heads,
                                                                           d_head)
                v = (x @ self.w(f"{p}.self_attn.v_proj.weight").T).view(1, length, kv_heads,
                                                                           d_head)
                q, k = rope(q.transpose(1, 2)), rope(k.transpose(1, 2))
                self.k_cache[i, :, begin:end] = k[0].half()
                self.v_cache[i, :, begin:end] = v.transpose(1, 2)[0].half()
                keys = self.k_cache[i, :, :end].float().repeat_interleave(heads // kv_heads, 0)
                values = self.v_cache[i, :, :end].float().repeat_interleave(heads // kv_heads, 0)
                att = torch.softmax(q[0] @ keys.transpose(1, 2) * d_head ** -0.5
                                    + causal_mask[0], dim=-1) @ values
                att = att.transpose(0, 1).reshape(1, length, heads * d_head)
                h = h + att @ self.w(f"{p}.self_attn.o_proj.weight").T
                x = self.norm(h, f"{p}.post_attention_layernorm.weight")
                gate = x @ self.w(f"{p}.mlp.gate_proj.weight").T
                up = x @ self.w(f"{p}.mlp.up_proj.weight").T
                h = h + (torch.nn.functional.silu(gate) * up) @ self.w(
                    f"{p}.mlp.down_proj.weight").T
            head = "lm_head.weight" if "lm_head.weight" in weights else "model.embed_tokens.weight"
            return self.norm(h, "model.norm.weight") @ self.w(head).T

    model = Llama().eval()
    example = (torch.zeros((1, 2), dtype=torch.int32), torch.zeros((1, 1, 2, 5)))
    traced = torch.jit.trace(model, example)
    query = ct.RangeDim(lower_bound=1, upper_bound=max_context, default=1)
    end = ct.RangeDim(lower_bound=1, upper_bound=max_context, default=1)
    cache = ct.TensorType(shape=(layers, kv_heads, max_context, d_head), dtype=np.float16)
    mlmodel = ct.convert(
        traced,
        inputs=[ct.TensorType(shape=(1, query), dtype=np.int32, name="input_ids"),
                ct.TensorType(shape=(1, 1, query, end), dtype=np.float16, name="causal_mask")],
        outputs=[ct.TensorType(dtype=np.float16, name="logits")],
        states=[ct.StateType(wrapped_type=cache, name="k_cache"),
                ct.StateType(wrapped_type=cache, name="v_cache")],
        minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT16,
        skip_model_load=True)
    if precision == "int8":
        from coremltools.optimize import coreml as cto

        config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel",
            weight_threshold=0))
        mlmodel = cto.linear_quantize_weights(mlmodel, config=config)
    mlmodel.save(out)


def torch_available() -> str | None:
    """None when the torch baseline can run, else why not."""
    if not BENCH_PYTHON.exists():
        return (f"{BENCH_PYTHON.relative_to(ROOT)} not found: run `make bench-export-torch` to "
                "create it (torch==2.13.0 coremltools==9.0 numpy; never a project dependency)")
    probe = subprocess.run([str(BENCH_PYTHON), "-c", "import torch, coremltools"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"{BENCH_PYTHON} cannot import torch and coremltools: {probe.stderr.strip()[-200:]}"
    return None


# ---- the benchmark ----

def run(args) -> tuple[list[dict], dict, str | None]:
    sizes = [s for s in args.sizes.split(",") if s]
    precisions = [p for p in args.precisions.split(",") if p]
    no_torch = "disabled (--torch off)" if args.torch == "off" else torch_available()
    # What a process holds after its imports alone, to read small-model peaks against.
    baseline = {"ours": measure([sys.executable, "-c", OUR_IMPORTS])}
    if no_torch is None:
        baseline["torch"] = measure([str(BENCH_PYTHON), "-c", TORCH_IMPORTS])
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-export-") as work:
        work = Path(work)
        for size in sizes:
            ckpt = work / f"{size}-ckpt"
            made = subprocess.run([sys.executable, __file__, "--make-checkpoint", size,
                                   str(ckpt)], cwd=ROOT, env=CHILD_ENV, capture_output=True,
                                  text=True, check=True)
            params = int(made.stdout.strip().splitlines()[-1])
            print(f"{size}: {params / 1e6:.1f}M parameters (random, float32 checkpoint)",
                  file=sys.stderr)
            for precision in precisions:
                pkg = work / f"{size}-{precision}.mlpackage"
                out = work / f"{size}-{precision}-torch.mlpackage"
                ours_runs, torch_runs = [], []
                for _ in range(args.repeats):  # alternating, so drift hits both alike
                    ours_runs.append(measure([
                        sys.executable, "-m", "mlx_distill", "export-coreml", str(ckpt),
                        "--out", str(pkg), "--precision", precision]))
                    contract = json.loads(
                        (work / f"{size}-{precision}.contract.json").read_text())
                    if no_torch is None:
                        torch_runs.append(measure([
                            str(BENCH_PYTHON), __file__, "--torch-export", str(ckpt), str(out),
                            precision, str(contract["max_context"])]))
                sizes_info = contract["sizes"]
                row = {"size": size, "params": params, "precision": precision,
                       "ours": summarize(ours_runs), "stages": contract["export_seconds"],
                       "blob_bytes": sizes_info["weight_blob_bytes"],
                       "package_bytes": dir_bytes(pkg),
                       "floor_bytes": sizes_info["floor_bytes"],
                       "blob_over_floor": sizes_info["blob_over_floor"], "torch": None}
                if torch_runs:
                    row["torch"] = {**summarize(torch_runs), "package_bytes": dir_bytes(out)}
                    shutil.rmtree(out)
                shutil.rmtree(pkg)
                for side in ("ours", "torch"):
                    if row[side] is not None:
                        print(f"  {side:<5} {precision}: {row[side]['seconds']:.1f} s, "
                              f"{_gib(row[side]['peak_rss_bytes'])} GiB", file=sys.stderr)
                rows.append(row)
            shutil.rmtree(ckpt)
    return rows, baseline, no_torch


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def print_table(rows: list[dict], baseline: dict, no_torch: str | None) -> None:
    print("export-coreml (ours): wall time and peak RSS of the export process, package size")
    print(f"{'size':<6} {'params':>7} {'prec':<5} {'seconds':>8} {'peak GiB':>9} "
          f"{'blob MB':>8} {'floor MB':>9} {'blob/floor':>10} {'package MB':>11}")
    for r in rows:
        print(f"{r['size']:<6} {r['params'] / 1e6:>6.1f}M {r['precision']:<5} "
              f"{r['ours']['seconds']:>8.1f} {_gib(r['ours']['peak_rss_bytes']):>9} "
              f"{r['blob_bytes'] / 1e6:>8.1f} {r['floor_bytes'] / 1e6:>9.1f} "
              f"{r['blob_over_floor']:>10.3f} {r['package_bytes'] / 1e6:>11.1f}")
    for r in rows:
        stages = ", ".join(f"{k} {v} s" for k, v in r["stages"].items())
        print(f"  {r['size']} {r['precision']} stages: {stages}")
    ours_base = baseline["ours"]
    print(f"imports alone ({OUR_IMPORTS}): {ours_base['seconds']} s, "
          f"{_gib(ours_base['peak_rss_bytes'])} GiB")
    if no_torch is not None:
        print(f"\ntorch comparison: not run: {no_torch}")
        return
    torch_base = baseline["torch"]
    print(f"\ntorch trace -> ct.convert (Apple's stateful-Llama recipe; one flexible function) "
          f"on the same weights; imports alone ({TORCH_IMPORTS}): {torch_base['seconds']} s, "
          f"{_gib(torch_base['peak_rss_bytes'])} GiB. Ratios ours/torch (goal <= 0.5 for both); "
          "'above imports' subtracts each side's import-only peak")
    print(f"{'size':<6} {'prec':<5} {'torch s':>8} {'torch GiB':>10} {'time ratio':>11} "
          f"{'memory ratio':>13} {'above imports':>14} {'torch pkg MB':>13}")
    for r in rows:
        t, ours = r["torch"], r["ours"]
        above = ((ours["peak_rss_bytes"] - ours_base["peak_rss_bytes"])
                 / max(1, t["peak_rss_bytes"] - torch_base["peak_rss_bytes"]))
        print(f"{r['size']:<6} {r['precision']:<5} {t['seconds']:>8.1f} "
              f"{_gib(t['peak_rss_bytes']):>10} {ours['seconds'] / t['seconds']:>11.2f} "
              f"{ours['peak_rss_bytes'] / t['peak_rss_bytes']:>13.2f} {above:>14.2f} "
              f"{t['package_bytes'] / 1e6:>13.1f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.make_checkpoint:
        make_checkpoint(*args.make_checkpoint)
        return 0
    if args.torch_export:
        ckpt, out, precision, context = args.torch_export
        torch_export(ckpt, out, precision, int(context))
        return 0
    rows, baseline, no_torch = run(args)
    print_table(rows, baseline, no_torch)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"rows": rows, "import_baseline": baseline, "torch_not_run": no_torch},
            indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
