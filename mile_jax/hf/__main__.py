"""`python -m mile_jax.hf export|import`: see `mile_jax.hf.convert`."""

from mile_jax.hf import convert

if __name__ == "__main__":
  convert.run()
