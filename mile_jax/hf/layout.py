"""The Hugging Face transformers LLaMA layout of this project's decoder: config and weights.

The decoder in `model.py` is a LLaMA: the same RMSNorm (computed in float32,
then scaled), SwiGLU feed-forward, untied embeddings, no biases, and the same
rotary embedding: `apply_rope` rotates the two halves of each head (x1, x2)
-> (x1 cos - x2 sin, x2 cos + x1 sin) with inverse frequencies
`theta ** (-i / (H/2))`, which is exactly transformers' `rotate_half`
convention. So queries and keys need no permutation here: the permutation
that transformers' conversion script applies to Meta's checkpoints turns
Meta's interleaved pairs into halves, and ours are halves already. Grouped
key/value heads match too: query head n reads key/value head n // (N/K) in
both `jax.nn.dot_product_attention` and transformers' `repeat_kv`.

Weight names and layouts (transformers stores `nn.Linear` weights as
(out, in); this project's kernels are (in, ...)):

  model.embed_tokens.weight            (V, D)    embed/embedding            (V, D)
  model.layers.i.self_attn.q_proj      (N*H, D)  layer_i/attention/query    (D, N, H)
  model.layers.i.self_attn.k_proj      (K*H, D)  layer_i/attention/key      (D, K, H)
  model.layers.i.self_attn.v_proj      (K*H, D)  layer_i/attention/value    (D, K, H)
  model.layers.i.self_attn.o_proj      (D, N*H)  layer_i/attention/out      (N, H, D)
  model.layers.i.mlp.gate_proj         (F, D)    layer_i/mlp/gate           (D, F)
  model.layers.i.mlp.up_proj           (F, D)    layer_i/mlp/up             (D, F)
  model.layers.i.mlp.down_proj         (D, F)    layer_i/mlp/down           (F, D)
  model.layers.i.input_layernorm       (D,)      layer_i/attention_norm     (D,)
  model.layers.i.post_attention_layernorm (D,)   layer_i/mlp_norm           (D,)
  model.norm.weight                    (D,)      final_norm/scale           (D,)
  lm_head.weight                       (V, D)    lm_head/kernel             (D, V)

With scanned blocks (`model.scan_layers`) the tree holds `layers/...` instead,
each array the layers' arrays stacked on a leading axis; `to_hf` and `from_hf`
take either layout.

Nothing here imports transformers or torch.
"""

import json
import os
from typing import Any

import jax
import numpy as np

from mile_jax.core import model as model_lib
from mile_jax.errors import ConfigError
from mile_jax.hf import safetensors_io

CONFIG_FILE = "config.json"
EMBEDDING = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
TOKENIZER_FILE = "tokenizer.model"

# (config.model field, LlamaConfig key, transformers' default when the key is absent).
FIELDS = (
    ("vocab_size", "vocab_size", 32000),
    ("d_model", "hidden_size", 4096),
    ("n_layers", "num_hidden_layers", 32),
    ("n_heads", "num_attention_heads", 32),
    ("n_kv_heads", "num_key_value_heads", None),  # None: num_attention_heads
    ("d_ff", "intermediate_size", 11008),
    ("max_seq_len", "max_position_embeddings", 2048),
    ("rope_theta", "rope_theta", 10000.0),
    ("norm_eps", "rms_norm_eps", 1e-6),
)


class HFError(ConfigError):
  """A Hugging Face directory or file this project cannot use; the message names it."""


def read_config(hf_dir: str) -> dict:
  """The directory's `config.json` as a dict."""
  path = os.path.join(hf_dir, CONFIG_FILE)
  if not os.path.isdir(hf_dir):
    raise HFError(f"{hf_dir}: no such directory")
  if not os.path.isfile(path):
    raise HFError(f"{hf_dir}: no {CONFIG_FILE} (a transformers model directory has one)")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise HFError(f"{path}: cannot be read as JSON ({e})") from None


def _rope_parameters(hf: dict) -> dict:
  """transformers 5 keeps `rope_theta` in `rope_parameters`; 4.x at the top level beside `rope_scaling`."""
  params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  return params if isinstance(params, dict) else {}


def model_fields(hf: dict) -> dict[str, Any]:
  """The `config.model` values that a LlamaConfig dict describes."""
  out = {}
  for field, key, default in FIELDS:
    if field == "rope_theta":
      value = _rope_parameters(hf).get("rope_theta", hf.get("rope_theta", default))
    else:
      value = hf.get(key, default)
    if field == "n_kv_heads" and value is None:
      value = out["n_heads"]
    out[field] = float(value) if field in ("rope_theta", "norm_eps") else int(value)
  return out


def unsupported(hf: dict) -> list[str]:
  """What a LlamaConfig dict asks for that this project's decoder does not compute."""
  out = []
  if hf.get("model_type", "llama") != "llama":
    out.append(f"model_type={hf.get('model_type')!r} (only 'llama')")
  if hf.get("hidden_act", "silu") != "silu":
    out.append(f"hidden_act={hf.get('hidden_act')!r} (only 'silu')")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key):
      out.append(f"{key}=true (no biases)")
  rope_type = _rope_parameters(hf).get("rope_type", _rope_parameters(hf).get("type", "default"))
  if rope_type != "default":
    out.append(f"rope_type={rope_type!r} (only unscaled RoPE)")
  fields = model_fields(hf)
  head_dim = hf.get("head_dim")
  if head_dim is not None and head_dim * fields["n_heads"] != fields["d_model"]:
    out.append(f"head_dim={head_dim} (must be hidden_size / num_attention_heads)")
  return out


def config_mismatches(model_config: Any, hf: dict) -> list[str]:
  """'model.<field>=<theirs> there, <ours> in this config' for every field that differs,
  and every unsupported feature. `max_seq_len` may be shorter than the directory's."""
  out = []
  for field, theirs in model_fields(hf).items():
    ours = model_config[field]
    if field == "max_seq_len":
      if ours > theirs:
        out.append(f"model.max_seq_len={ours} in this config exceeds max_position_embeddings={theirs} there")
    elif (float(ours) != float(theirs)) if isinstance(theirs, float) else ours != theirs:
      out.append(f"model.{field}={theirs!r} there, {ours!r} in this config")
  return out + [f"unsupported {u}" for u in unsupported(hf)]


def check_directory(hf_dir: str, model_config: Any) -> None:
  """Raises HFError naming every difference between `model_config` and the directory's
  config.json, the flags that would fix them, or missing weights; reads no weights."""
  hf = read_config(hf_dir)
  problems = config_mismatches(model_config, hf)
  if problems:
    wanted = model_fields(hf)
    fixes = [f"--config.model.{f}={v}" for f, v in wanted.items()
             if (model_config[f] > v if f == "max_seq_len" else model_config[f] != v)]
    fix = f"; set {' '.join(fixes)}" if fixes else ""
    raise HFError(f"{os.path.join(hf_dir, CONFIG_FILE)} describes another model: {'; '.join(problems)}{fix}")
  try:
    present = safetensors_io.tensor_names(hf_dir)
  except (safetensors_io.SafetensorsError, OSError) as e:
    raise HFError(str(e)) from None
  if LM_HEAD not in present and EMBEDDING in present and not tied(hf):
    raise HFError(untied_without_head(hf_dir))


def tied(hf: dict) -> bool:
  """Whether a LlamaConfig dict ties the output layer to the input embedding (transformers' default: no)."""
  return bool(hf.get("tie_word_embeddings", False))


def untied_without_head(hf_dir: str) -> str:
  return (f"{hf_dir}: {LM_HEAD} is missing but {CONFIG_FILE} has tie_word_embeddings=false (the output layer "
          "is not the embedding); the weights are incomplete")


def tokenizer_path(hf_dir: str) -> str | None:
  """The directory's SentencePiece `tokenizer.model`, if it has one."""
  path = os.path.join(hf_dir, TOKENIZER_FILE)
  return path if os.path.isfile(path) else None


def hf_config(model: Any, *, bos_id: int, eos_id: int, pad_id: int | None, dtype: str) -> dict:
  """The LlamaConfig dict of a model with the fields of `config.model`.

  `rope_theta` is written both inside `rope_parameters` (transformers 5) and at
  the top level (transformers 4, vLLM). `pad_id` None: no padding token.
  """
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": model["vocab_size"], "hidden_size": model["d_model"],
      "intermediate_size": model["d_ff"], "num_hidden_layers": model["n_layers"],
      "num_attention_heads": model["n_heads"], "num_key_value_heads": model["n_kv_heads"],
      "head_dim": model["d_model"] // model["n_heads"], "hidden_act": "silu",
      "max_position_embeddings": model["max_seq_len"], "initializer_range": model["init_std"],
      "rms_norm_eps": model["norm_eps"], "rope_theta": model["rope_theta"],
      "rope_parameters": {"rope_type": "default", "rope_theta": model["rope_theta"]},
      "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
      "tie_word_embeddings": False, "use_cache": True,
      "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
      "dtype": dtype, "torch_dtype": dtype,  # transformers 5 reads "dtype", 4 "torch_dtype"
  }


def _layer_names(i: int) -> dict[str, tuple[str, ...]]:
  p = f"model.layers.{i}."
  layer = f"layer_{i}"
  return {p + "self_attn.q_proj.weight": (layer, "attention", "query", "kernel"),
          p + "self_attn.k_proj.weight": (layer, "attention", "key", "kernel"),
          p + "self_attn.v_proj.weight": (layer, "attention", "value", "kernel"),
          p + "self_attn.o_proj.weight": (layer, "attention", "out", "kernel"),
          p + "mlp.gate_proj.weight": (layer, "mlp", "gate", "kernel"),
          p + "mlp.up_proj.weight": (layer, "mlp", "up", "kernel"),
          p + "mlp.down_proj.weight": (layer, "mlp", "down", "kernel"),
          p + "input_layernorm.weight": (layer, "attention_norm", "scale"),
          p + "post_attention_layernorm.weight": (layer, "mlp_norm", "scale")}


def names(n_layers: int) -> dict[str, tuple[str, ...]]:
  """transformers tensor name -> path in this project's parameter tree, in file order."""
  out = {"model.embed_tokens.weight": ("embed", "embedding")}
  for i in range(n_layers):
    out.update(_layer_names(i))
  out["model.norm.weight"] = ("final_norm", "scale")
  out["lm_head.weight"] = ("lm_head", "kernel")
  return out


def _to_hf(path: tuple[str, ...], x: np.ndarray) -> np.ndarray:
  if path[-1] != "kernel":
    return x  # embedding (V, D) and norm scales (D,) are stored alike
  if path[-2] in ("query", "key", "value"):
    return x.reshape(x.shape[0], -1).T  # (D, N, H) -> (N*H, D)
  if path[-2] == "out":
    return x.reshape(-1, x.shape[-1]).T  # (N, H, D) -> (D, N*H)
  return x.T  # (D, F) -> (F, D), (F, D) -> (D, F), (D, V) -> (V, D)


def _from_hf(path: tuple[str, ...], x: np.ndarray, head_dim: int) -> np.ndarray:
  if path[-1] != "kernel":
    return x
  if path[-2] in ("query", "key", "value"):
    return x.T.reshape(x.shape[1], -1, head_dim)  # (N*H, D) -> (D, N, H), a view
  if path[-2] == "out":
    return x.T.reshape(-1, head_dim, x.shape[0])  # (D, N*H) -> (N, H, D), a view
  return x.T


def hf_view(path: tuple[str, ...], x: np.ndarray) -> np.ndarray:
  """The transformers layout of the array at `path` (one layer's), as a NumPy view of `x`."""
  return _to_hf(path, x)


def export_order(n_layers: int, scanned: bool) -> list[tuple[tuple[str, ...], list[tuple[str, tuple, int | None]]]]:
  """[(path of a saved parameter array, [(transformers name, per-layer path, layer or None)])]:
  each saved array once, with the tensors made from it (from a scanned `layers` array,
  layer i of its leading axis for every i), in the order `names` lists them when the
  blocks are unrolled. The per-layer path is the one `hf_view` takes."""
  expected = names(n_layers)
  if not scanned:
    return [(path, [(name, path, None)]) for name, path in expected.items()]
  first, per_layer = {}, {}
  for name, path in expected.items():
    if path[0].startswith(model_lib.LAYER_PREFIX):
      stacked = (model_lib.SCANNED, *path[1:])
      per_layer.setdefault(stacked, []).append((name, path, int(path[0][len(model_lib.LAYER_PREFIX):])))
      first.setdefault(stacked, None)
    else:
      first[path] = [(name, path, None)]
  return [(path, tensors if tensors is not None else per_layer[path]) for path, tensors in first.items()]


def to_hf(params: Any, n_layers: int) -> dict[str, np.ndarray]:
  """{transformers name: array (C-contiguous)} from a host parameter tree (any float dtype),
  its blocks unrolled or scanned (`model.scan_layers`)."""
  params = model_lib.unrolled_layers(params, n_layers)
  out = {}
  for name, path in names(n_layers).items():
    node = params
    for part in path:
      node = node[part]
    out[name] = np.ascontiguousarray(_to_hf(path, np.asarray(node)))
  return out


def from_hf(tensors: dict[str, np.ndarray], abstract_params: Any, n_layers: int, head_dim: int,
            where: str = "", tie_word_embeddings: bool = False) -> tuple[Any, list[str]]:
  """(parameter tree of array views in the stored dtype, notes) from transformers tensors
  (NumPy arrays, or `safetensors_io.LazyTensor`s that stay unread until sliced).

  `abstract_params` (leaves with `.shape`) gives the expected shapes and the
  layout: with scanned blocks (`model.scan_layers`) each `layers` leaf is a
  `StackedView` of the per-layer views, so nothing is copied here either. With
  `tie_word_embeddings` (config.json's), a missing `lm_head.weight` is filled
  with the input embedding, which reproduces the tied model's function; the
  two are trained apart from then on, and a note says so.

  Raises:
    HFError: naming the first tensor that is missing, unexpected, or of another shape.
  """
  notes = []
  tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
  if LM_HEAD not in tensors and EMBEDDING in tensors:
    if not tie_word_embeddings:
      raise HFError(untied_without_head(where))
    tensors[LM_HEAD] = tensors[EMBEDDING]
    notes.append("lm_head.weight is absent (tied embeddings): the output layer starts as a copy of the "
                 "input embedding and is trained separately")
  scanned = model_lib.is_scanned(abstract_params)
  abstract_params = model_lib.unrolled_layers(abstract_params, n_layers)
  expected = names(n_layers)
  extra = sorted(set(tensors) - set(expected))
  if extra:
    raise HFError(f"{where}: tensor {extra[0]} has no counterpart in this model "
                  f"({len(extra)} such tensors; biases and other architectures are not supported)")
  tree: dict = {}
  for name, path in expected.items():
    if name not in tensors:
      raise HFError(f"{where}: tensor {name} is missing")
    node, want = tree, abstract_params
    for part in path:
      want = want[part]
    tensor, convert = tensors[name], lambda x, path=path: _from_hf(path, x, head_dim)
    value = tensor.apply(convert) if isinstance(tensor, safetensors_io.LazyTensor) else convert(tensor)
    if tuple(value.shape) != tuple(want.shape):
      raise HFError(f"{where}: tensor {name} has shape {tuple(tensors[name].shape)}, which is "
                    f"{tuple(value.shape)} in this layout; the model needs {tuple(want.shape)}")
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = value
  if scanned:
    layers = [tree.pop(f"{model_lib.LAYER_PREFIX}{i}") for i in range(n_layers)]
    tree[model_lib.SCANNED] = jax.tree.map(lambda *views: StackedView(views), *layers)
  return tree, notes


class StackedView:
  """The per-layer arrays `views` as one (n_layers, ...) array, read by slices: indexing
  copies only the layers and elements asked for (what `place` reads per device)."""

  def __init__(self, views):
    self.views = views
    self.shape = (len(views), *views[0].shape)
    self.dtype = views[0].dtype

  def __getitem__(self, index):
    index = index if isinstance(index, tuple) else (index,)
    first, rest = (index[0], index[1:]) if index else (slice(None), ())
    layers = range(len(self.views))[first]
    if isinstance(layers, int):
      return np.array(self.views[layers][rest])
    out = None
    for j, i in enumerate(layers):  # Filled layer by layer: no list of copies beside the result.
      layer = self.views[i][rest]
      if out is None:
        out = np.empty((len(layers), *np.shape(layer)), self.dtype)
      out[j] = layer
    return out if out is not None else np.empty((0, *self.shape[1:]), self.dtype)[(slice(None), *rest)]

  def __array__(self, dtype=None, copy=None):
    del copy
    out = self[:]
    return out if dtype is None else out.astype(dtype)


def load_params(hf_dir: str, abstract_params: Any, n_layers: int, head_dim: int, echo=print) -> Any:
  """`from_hf` of the directory's safetensors (single file or sharded): leaves that read
  their file only when sliced (`safetensors_io.LazyTensor`); its notes go to `echo`."""
  try:
    tensors = safetensors_io.read_dir(hf_dir)
  except (safetensors_io.SafetensorsError, OSError) as e:
    raise HFError(str(e)) from None
  tree, notes = from_hf(tensors, abstract_params, n_layers, head_dim, where=hf_dir,
                        tie_word_embeddings=tied(read_config(hf_dir)))
  for note in notes:
    echo(f"{hf_dir}: {note}")
  return tree


def with_hf_tokenizer(config: Any) -> Any:
  """`config`, or with `init.from_hf` and no `data.tokenizer_path` a copy whose
  `data.tokenizer_path` is that directory's tokenizer.model."""
  hf_dir = config.init.from_hf
  if not hf_dir or config.data.tokenizer_path or tokenizer_path(hf_dir) is None:
    return config
  config = config.copy_and_resolve_references()
  config.data.tokenizer_path = tokenizer_path(hf_dir)
  return config


def owned_float32(x: np.ndarray) -> np.ndarray:
  """`x` as float32 in memory of its own: copied unless it already owns its data (a stacked slice)."""
  return x.astype(np.float32) if x.dtype != np.float32 or not x.flags.owndata else x


def place(tree: Any, shardings: Any) -> Any:
  """float32 jax.Arrays with `shardings`, placed one leaf at a time, each device reading only
  its own slice of the views. The slice is copied off the file: a CPU backend would otherwise
  keep the memory-mapped view as the device buffer, and with it the file's pages in memory."""
  def one(view, sharding):
    return jax.make_array_from_callback(view.shape, sharding, lambda index: owned_float32(view[index]))
  return jax.tree.map(one, tree, shardings)
