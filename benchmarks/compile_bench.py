"""Compile time and program size of the train step against depth: unrolled vs scanned layers.

For each depth, layer layout (`model.scan_layers`) and number of micro-batches,
the real jitted train step (the Trainer's, with its shardings and donated
state) is lowered for abstract inputs and compiled for 8 simulated CPU devices
(mesh 1,8,1: FSDP), in a fresh process each, so that no cache is shared. The
table gives the seconds to lower (trace) and to compile, the `dot_general`s in
the lowered program, and the `dot` instructions and bytes of the optimised HLO.

    python benchmarks/compile_bench.py                      # depths 4 8 16 32, width 256
    python benchmarks/compile_bench.py --layers 4 32 --microbatches 8 --d_model 512
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(layers: int, scanned: bool, microbatches: int, d_model: int, devices: int) -> dict:
  """Runs in a child process (fresh JAX, `devices` CPU devices): lower and compile one train step."""
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path.insert(0, ROOT)
  import jax  # pylint: disable=import-outside-toplevel
  from mile_jax import config_lib, plan, train_lib  # pylint: disable=import-outside-toplevel
  c = config_lib.base_config()
  c.model.update(n_layers=layers, d_model=d_model, n_heads=max(1, d_model // 64), n_kv_heads=max(1, d_model // 64),
                 d_ff=4 * d_model, vocab_size=8192, max_seq_len=256, scan_layers=scanned)
  c.data.update(seq_len=256, global_batch_size=8 * microbatches)
  c.train.microbatches = microbatches
  c.mesh.update(shape=(1, devices, 1), num_devices=devices)
  with tempfile.TemporaryDirectory() as workdir:
    trainer = train_lib.Trainer(c, workdir, devices=jax.devices()[:devices])
    start = time.perf_counter()
    lowered = trainer.lower_train_step(plan.abstract_batch(c))
    lowered_text = lowered.as_text()
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    hlo = compiled.as_text()
  return {"lower_s": lower_s, "compile_s": compile_s, "lowered_dots": lowered_text.count("stablehlo.dot_general"),
          "hlo_dots": len(re.findall(r" dot\(", hlo)), "hlo_bytes": len(hlo.encode())}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 32])
  p.add_argument("--microbatches", type=int, nargs="+", default=[1, 8])
  p.add_argument("--d_model", type=int, default=256)
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--child", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    print(json.dumps(measure(**json.loads(args.child))))
    return
  print(f"train step on {args.devices} simulated CPU devices (mesh 1,{args.devices},1), d_model {args.d_model}, "
        f"vocab 8192, 256 tokens x 8 rows per micro-batch; a fresh process per row\n")
  print("| layers | layout | micro-batches | lower s | compile s | dot_general (lowered) | dot (optimised) "
        "| optimised HLO KiB |")
  print("|---|---|---|---|---|---|---|---|")
  for microbatches in args.microbatches:
    for scanned in (False, True):
      for layers in args.layers:
        spec = dict(layers=layers, scanned=scanned, microbatches=microbatches, d_model=args.d_model,
                    devices=args.devices)
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                             text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {layers} | {'scanned' if scanned else 'unrolled'} | {microbatches} | {r['lower_s']:.1f} "
              f"| {r['compile_s']:.1f} | {r['lowered_dots']} | {r['hlo_dots']} | {r['hlo_bytes'] / 1024:.0f} |",
              flush=True)


if __name__ == "__main__":
  main()
