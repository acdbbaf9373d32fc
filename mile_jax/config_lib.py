"""The config schema (defaults for every field) and its validation.

Config files under `configs/` start from `base_config()` and change what
they need. `validate(config)` runs before anything is built or compiled and
raises `ConfigError` with one line naming the setting to fix.
"""

import math
import numbers

import jax
import ml_collections

from mile_jax.core import attention as attention_lib
from mile_jax.core import losses
from mile_jax.core import model as model_lib
from mile_jax.data import corpus as corpus_lib
from mile_jax.data import mixture as mixture_lib
from mile_jax.data import tokenizer as tokenizer_lib
from mile_jax.errors import ConfigError  # Also reached as config_lib.ConfigError.
from mile_jax.hf import layout as hf_layout

DTYPES = ("float32", "bfloat16")
LOSS_IMPLS = ("naive", "chunked")

# Logical axis -> mesh axes. Parameters use the plain names, activations the
# `activation_*` names, so that a dimension can be sharded differently when it
# is a weight (embed over fsdp) and when it is an activation (replicated).
DEFAULT_RULES = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("norm", None),
    ("layers", None),  # The stacked axis of scanned blocks (model.scan_layers): every device holds every layer.
)


def base_config() -> ml_collections.ConfigDict:
  """Every field with a default; a tiny model on the built-in corpus."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds initialisation and data order.

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 1024  # Must equal the tokenizer's vocabulary size.
  c.model.d_model = 128  # Width of the residual stream.
  c.model.n_layers = 4  # Number of decoder blocks.
  c.model.n_heads = 4  # Query heads; head_dim = d_model / n_heads.
  c.model.n_kv_heads = 4  # Key/value heads (grouped-query attention when < n_heads).
  c.model.d_ff = 384  # SwiGLU hidden width.
  c.model.max_seq_len = 256  # Longest sequence the model accepts.
  c.model.rope_theta = 10000.0  # RoPE base frequency.
  c.model.norm_eps = 1e-5  # RMSNorm epsilon.
  c.model.init_std = 0.01  # Std of every weight's normal initialiser (the paper's 0.01).
  c.model.dtype = "float32"  # Compute dtype: float32 or bfloat16 (no float16: no loss scaling). Params stay float32.
  c.model.remat = "none"  # Rematerialisation per block: none, full, dots, dots_no_batch (docs/scaling.md).
  # With scanned layers "none" recomputes only elementwise results in the backward pass, no matmul.
  # The blocks as one nn.scan over stacked parameters: the step's program and its compile time stay the
  # same size at any depth. None: scan from model.SCAN_LAYERS_FROM layers on. Checkpoints convert on restore.
  c.model.scan_layers = ml_collections.config_dict.placeholder(bool)
  # Attention kernel (docs/attention.md): xla, splash (Pallas TPU kernel; interpret mode off TPU),
  # cudnn (NVIDIA GPU, bfloat16), or auto: splash on TPU, cudnn on GPU where it can, else xla.
  c.model.attention = "auto"

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "mile"  # mile, focal or cross_entropy.
  c.loss.gamma = 1.0  # Exponent of the weight (mile and focal); 0 gives cross-entropy.
  c.loss.sigma = 1.0  # MiLe's offset in (sigma + entropy) ** gamma.
  c.loss.impl = "naive"  # naive: full logits then the loss; chunked: blockwise from hidden states (core/fused_loss.py).
  c.loss.block_size = 256  # chunked: tokens per block (the [block, vocab] logits are the largest temporary).
  c.loss.vocab_block_size = 0  # chunked: vocabulary columns per block with an online logsumexp; 0 = whole vocabulary.

  c.data = ml_collections.ConfigDict()
  c.data.source = "builtin:pydocs"  # Corpus (docs/data.md); "mix:[name=]source@weight,..." mixes several.
  c.data.seq_len = 128  # Tokens per training row (targets are shifted by one).
  c.data.global_batch_size = 16  # Rows per step across all devices and processes.
  c.data.val_fraction = 0.05  # Fraction of documents held out for validation.
  c.data.cache_dir = ""  # Prepared data and tokenizers; "" = $MILE_JAX_CACHE or ~/.cache/mile_jax.
  c.data.tokenizer_path = ""  # A SentencePiece .model to load; "" = train one on the train split.
  c.data.tokenizer_model_type = "bpe"  # SentencePiece model type when training: bpe or unigram.
  c.data.character_coverage = 1.0  # SentencePiece character coverage when training.
  c.data.byte_fallback = True  # Unknown characters fall back to bytes.
  c.data.tokenizer_train_documents = 100_000  # Train the tokenizer on at most this many train documents.
  c.data.add_bos = False  # Put the tokenizer's BOS before every document (targets at BOS are masked).
  c.data.add_eos = True  # Put the tokenizer's EOS after every document.
  c.data.segment_documents = False  # Batches carry segment_ids/positions: attention stays in a document.
  c.data.data_dir = ""  # files: where to prepare ("" = cache_dir/prepared); tfds: TFDS data_dir (or gs://).
  c.data.train_split = "train"  # tfds: training split (TFDS slicing such as "train[:90%]" works).
  c.data.val_split = ""  # tfds: validation split; "" = "validation" if present, else hold out val_fraction.
  c.data.text_field = "text"  # Text field of JSON Lines records and of TFDS features.
  c.data.txt_documents = "file"  # files: a .txt is one document ("file") or one per blank-line block.
  c.data.decode_errors = "replace"  # files: invalid UTF-8 is replaced (U+FFFD) or the document skipped ("skip").
  c.data.tfds_download = False  # tfds: download and prepare (as array_record) a dataset that is missing.
  c.data.synthetic_train_tokens = 1_000_000  # synthetic:zipf: training tokens sampled.
  c.data.synthetic_val_tokens = 100_000  # synthetic:zipf: validation tokens (an independent sample).
  c.data.synthetic_seed = 0  # synthetic:zipf: seeds the language itself (not the data order).
  c.data.synthetic_zipf_exponent = 1.1  # synthetic:zipf: exponent of the unigram start distribution.
  c.data.prefetch = 2  # Batches prepared ahead in a background thread.

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 3e-3  # Peak learning rate.
  c.optim.warmup_steps = 30  # Linear warm-up steps.
  c.optim.final_lr_ratio = 0.1  # Cosine decays to learning_rate * final_lr_ratio.
  c.optim.weight_decay = 0.1  # AdamW decoupled weight decay (matrices only).
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.grad_clip_norm = 1.0  # Global-norm clipping; 0 disables it.

  c.train = ml_collections.ConfigDict()
  c.train.steps = 300  # Total optimizer steps.
  c.train.microbatches = 1  # Gradient accumulation: micro-batches per step.
  c.train.log_every = 25  # Steps between metric logs (the only host syncs).
  c.train.eval_every = 100  # Steps between validation evaluations (loss, per-frequency-bucket perplexity); 0 disables.
  c.train.eval_batches = 8  # Validation batches per evaluation.
  c.train.peak_flops_per_device = 0.0  # For MFU; 0 = look up the device kind (none on CPU).
  c.train.skip_nonfinite = False  # Skip (and count) updates with a non-finite loss or gradient; False = stop.
  # Benchmarks scored during training by eval.py's code on the live parameters (docs/training.md). The
  # task settings mean what eval.py's flags of the same name mean; a task's data is checked before step 1.
  c.train.eval_tasks = ""  # Comma-separated eval.py benchmark names, e.g. "piqa,hellaswag,arc_easy"; "" = none.
  c.train.eval_tasks_every = 1000  # Steps between benchmark evaluations (and one at the last step).
  c.train.eval_tasks_limit = 0  # Score the first N documents of each task (MMLU: of each subject); 0 = all (--limit).
  c.train.eval_tasks_shots = -1  # Few-shot examples per prompt; -1 = each task's default: 0, MMLU 5 (--num_fewshot).
  c.train.eval_tasks_source = "local"  # Documents from local files, tfds, or auto: local where present (--task_source).
  c.train.eval_tasks_data_dir = ""  # Directory of <task>/<split>.jsonl task files (--task_data_dir).
  c.train.eval_tasks_tfds_data_dir = ""  # TFDS data directory of prepared benchmarks; "" = TFDS's (--tfds_data_dir).
  c.train.eval_tasks_batch_size = 32  # Rows per forward pass while scoring (--batch_size).
  # A jax.profiler trace of a few steps into <workdir>/tensorboard/plugins/profile (docs/training.md).
  c.train.profile_steps = 0  # Steps to trace; 0 = no trace.
  c.train.profile_start_step = 10  # The first traced step (step N is the N-th update, as logged); past compilation.
  c.train.profile_server_port = 0  # Port of a jax.profiler server to capture traces on demand; 0 = none.

  c.init = ml_collections.ConfigDict()
  # A transformers LLaMA directory (config.json, safetensors, tokenizer.model) whose weights start a fresh
  # run (docs/hf.md); its config.json must match config.model, the optimizer starts fresh, and its
  # tokenizer.model is used unless data.tokenizer_path is set. "" = random initialisation.
  c.init.from_hf = ""

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 100  # Steps between checkpoints (and one at the end).
  c.checkpoint.max_to_keep = 3  # Newest checkpoints kept.
  c.checkpoint.async_save = True  # Save in the background where the backend allows.

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); one -1 takes the remaining devices.
  c.mesh.rules = DEFAULT_RULES  # Logical axis -> mesh axes.
  c.mesh.num_devices = 0  # Use only the first N devices of a single process; 0 = all devices.

  # Multi-process runs (see mile_jax/run/distributed.py). Left unset, a run on a
  # TPU VM or under SLURM finds these itself, and anywhere else runs alone.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ""  # host:port of process 0; "" = $JAX_COORDINATOR_ADDRESS or detect.
  c.distributed.num_processes = 0  # Processes in the run; 0 = $JAX_NUM_PROCESSES or detect.
  c.distributed.process_id = -1  # This process's index; -1 = $JAX_PROCESS_ID or detect.
  return c


def _fail(setting: str, message: str):
  raise ConfigError(f"{setting}: {message}")


def _number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_positive_int(config, *settings: str):
  for setting in settings:
    value = _get(config, setting)
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
      _fail(setting, f"must be a positive integer, got {value!r}")


def _check_finite(config, setting: str, minimum: float, strict: bool = False):
  value = _get(config, setting)
  if not _number(value) or not math.isfinite(value) or value < minimum or (strict and value == minimum):
    bound = f"> {minimum}" if strict else f">= {minimum}"
    _fail(setting, f"must be a finite number {bound}, got {value!r}")


def _get(config, setting: str):
  node = config
  for part in setting.split("."):
    node = node[part]
  return node


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first setting that cannot work."""
  m, d, t, o = config.model, config.data, config.train, config.optim
  _check_positive_int(config, "model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads",
                      "model.n_kv_heads", "model.d_ff", "model.max_seq_len", "data.seq_len",
                      "data.global_batch_size", "train.steps", "train.microbatches", "train.log_every",
                      "train.eval_batches", "checkpoint.every_steps", "checkpoint.max_to_keep")
  if m.d_model % m.n_heads:
    _fail("model.n_heads", f"must divide model.d_model={m.d_model}, got {m.n_heads}")
  if (m.d_model // m.n_heads) % 2:
    _fail("model.n_heads", f"head dimension d_model/n_heads={m.d_model // m.n_heads} must be even for RoPE")
  if m.n_heads % m.n_kv_heads:
    _fail("model.n_kv_heads", f"must divide model.n_heads={m.n_heads}, got {m.n_kv_heads}")
  if m.dtype == "float16":
    _fail("model.dtype", "float16 is not supported (there is no loss scaling, so small gradients underflow); "
          "use bfloat16, which has float32's range")
  if m.dtype not in DTYPES:
    _fail("model.dtype", f"must be one of {DTYPES}, got {m.dtype!r}")
  if m.remat not in model_lib.REMAT_POLICIES:
    _fail("model.remat", f"must be one of {model_lib.REMAT_POLICIES}, got {m.remat!r}")
  _check_finite(config, "model.init_std", 0.0, strict=True)
  _check_finite(config, "model.norm_eps", 0.0, strict=True)
  _check_attention(config)

  if config.loss.name not in losses.LOSS_NAMES:
    _fail("loss.name", f"must be one of {losses.LOSS_NAMES}, got {config.loss.name!r}")
  _check_finite(config, "loss.gamma", 0.0)
  _check_finite(config, "loss.sigma", 0.0)
  if config.loss.impl not in LOSS_IMPLS:
    _fail("loss.impl", f"must be one of {LOSS_IMPLS}, got {config.loss.impl!r}")
  _check_positive_int(config, "loss.block_size")
  vocab_block = config.loss.vocab_block_size
  if not isinstance(vocab_block, numbers.Integral) or isinstance(vocab_block, bool) or vocab_block < 0:
    _fail("loss.vocab_block_size", f"must be an integer >= 0 (0 = whole vocabulary), got {vocab_block!r}")

  if d.seq_len > m.max_seq_len:
    _fail("data.seq_len", f"{d.seq_len} is longer than model.max_seq_len={m.max_seq_len}")
  _check_finite(config, "data.val_fraction", 0.0, strict=True)
  if d.val_fraction >= 0.5:
    _fail("data.val_fraction", f"must be below 0.5, got {d.val_fraction}")
  _check_data(config)
  _check_init(config)
  if d.global_batch_size % t.microbatches:
    _fail("train.microbatches", f"must divide data.global_batch_size={d.global_batch_size}, got {t.microbatches}")

  _check_finite(config, "optim.learning_rate", 0.0, strict=True)
  _check_finite(config, "optim.weight_decay", 0.0)
  _check_finite(config, "optim.final_lr_ratio", 0.0)
  _check_finite(config, "optim.grad_clip_norm", 0.0)
  if not isinstance(o.warmup_steps, numbers.Integral) or o.warmup_steps < 0:
    _fail("optim.warmup_steps", f"must be an integer >= 0, got {o.warmup_steps!r}")
  if o.warmup_steps >= t.steps:
    _fail("optim.warmup_steps", f"{o.warmup_steps} is not shorter than train.steps={t.steps}")
  for beta in ("optim.b1", "optim.b2"):
    value = _get(config, beta)
    if not _number(value) or not 0.0 <= value < 1.0:
      _fail(beta, f"must be in [0, 1), got {value!r}")
  if not isinstance(t.eval_every, numbers.Integral) or t.eval_every < 0:
    _fail("train.eval_every", f"must be an integer >= 0, got {t.eval_every!r}")
  _check_eval_tasks_and_profile(config)
  for flag in ("train.skip_nonfinite", "checkpoint.async_save"):
    if not isinstance(_get(config, flag), bool):
      _fail(flag, f"must be True or False, got {_get(config, flag)!r}")
  num_devices = config.mesh.num_devices
  if not isinstance(num_devices, numbers.Integral) or isinstance(num_devices, bool) or num_devices < 0:
    _fail("mesh.num_devices", f"must be an integer >= 0 (0 = all devices), got {num_devices!r}")
  if len(tuple(config.mesh.shape)) != 3:
    _fail("mesh.shape", f"must have 3 entries (data, fsdp, tensor), got {tuple(config.mesh.shape)}")


def _check_attention(config) -> None:
  m = config.model
  if m.attention not in attention_lib.IMPLEMENTATIONS:
    _fail("model.attention", f"must be one of {attention_lib.IMPLEMENTATIONS}, got {m.attention!r}")
  if m.attention != "cudnn":
    return
  why_not = attention_lib.cudnn_unsupported(m.dtype, m.d_model // m.n_heads, config.data.seq_len,
                                            config.data.segment_documents)
  if why_not:
    _fail("model.attention", f"{why_not}; use auto or xla")
  backend = jax.default_backend()  # Only for cudnn: other settings never start the backend here.
  if backend != "gpu" or getattr(jax.devices()[0], "compute_capability", None) is None:
    _fail("model.attention", f"cudnn needs an NVIDIA GPU, the backend here is {backend}; use auto or xla")


def _check_eval_tasks_and_profile(config) -> None:
  """Types and ranges of the train.eval_tasks* and train.profile_* settings; task names and task data are
  checked where the tasks are loaded (`evaluation.in_training`), also before anything compiles."""
  _check_positive_int(config, "train.eval_tasks_every", "train.eval_tasks_batch_size", "train.profile_start_step")
  for setting in ("train.eval_tasks", "train.eval_tasks_source", "train.eval_tasks_data_dir",
                  "train.eval_tasks_tfds_data_dir"):
    if not isinstance(_get(config, setting), str):
      _fail(setting, f"must be a string, got {_get(config, setting)!r}")
  for setting, minimum in (("train.eval_tasks_limit", 0), ("train.eval_tasks_shots", -1), ("train.profile_steps", 0),
                           ("train.profile_server_port", 0)):
    value = _get(config, setting)
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
      _fail(setting, f"must be an integer >= {minimum}, got {value!r}")
  if config.train.profile_server_port > 65535:
    _fail("train.profile_server_port", f"must be a port number (0 = none), got {config.train.profile_server_port}")
  t = config.train
  if t.profile_steps and isinstance(t.steps, numbers.Integral) and t.profile_start_step > t.steps:
    _fail("train.profile_start_step", f"{t.profile_start_step} is beyond train.steps={t.steps}: no step would be "
          f"traced (train.profile_steps={t.profile_steps}); set a step up to train.steps, or profile_steps=0")


def _check_init(config) -> None:
  """init.from_hf: the directory's config.json against config.model, its weights and tokenizer (no weights read)."""
  hf_dir = config.init.from_hf
  if not isinstance(hf_dir, str):
    _fail("init.from_hf", f"must be a directory or '', got {hf_dir!r}")
  if not hf_dir:
    return
  try:
    hf_layout.check_directory(hf_dir, config.model)
  except hf_layout.HFError as e:
    _fail("init.from_hf", str(e))
  if not config.data.tokenizer_path and hf_layout.tokenizer_path(hf_dir) is None:
    _fail("init.from_hf", f"{hf_dir} has no {hf_layout.TOKENIZER_FILE} (the SentencePiece model the data "
          "pipeline reads); set data.tokenizer_path to the SentencePiece model these weights were trained with")


def _check_data(config) -> None:
  d = config.data
  mixture_lib.check_source(d.source)  # A source, or a mix: of sources.
  choices = {"data.tokenizer_model_type": ("bpe", "unigram"), "data.txt_documents": ("file", "blank_line"),
             "data.decode_errors": ("replace", "skip")}
  for setting, allowed in choices.items():
    if _get(config, setting) not in allowed:
      _fail(setting, f"must be one of {allowed}, got {_get(config, setting)!r}")
  _check_positive_int(config, "data.tokenizer_train_documents", "data.prefetch", "data.synthetic_train_tokens",
                      "data.synthetic_val_tokens")
  _check_finite(config, "data.synthetic_zipf_exponent", 0.0, strict=True)
  value = d.character_coverage
  if not _number(value) or not 0.0 < value <= 1.0:
    _fail("data.character_coverage", f"must be in (0, 1], got {value!r}")
  for flag in ("data.add_bos", "data.add_eos", "data.segment_documents", "data.byte_fallback",
               "data.tfds_download"):
    if not isinstance(_get(config, flag), bool):
      _fail(flag, f"must be True or False, got {_get(config, flag)!r}")
  if not d.text_field:
    _fail("data.text_field", "must name a field, got ''")
  if (not d.tokenizer_path and not config.init.from_hf and d.source not in corpus_lib.GENERATED
      and not d.source.startswith("store:")):  # Trains one (a token store brings its own).
    tokenizer_lib.check_trainable_vocab_size(config.model.vocab_size, d.byte_fallback)


# The paper's model sizes (DESIGN.md section 2), LLaMA's 32000-token vocabulary.
PAPER_MODELS = {
    "468m": dict(n_layers=24, d_model=1024, n_heads=16, d_ff=4096, max_seq_len=1024),
    "1b": dict(n_layers=16, d_model=2048, n_heads=8, d_ff=8192, max_seq_len=1024),
    "7b": dict(n_layers=32, d_model=4096, n_heads=32, d_ff=11008, max_seq_len=2048),
}


# Remat policy and micro-batches per step for the paper sizes on 8 devices
# (mesh 1,8,1), from `python -m mile_jax.plan` (docs/scaling.md, "Will it fit"): for each
# size the least recomputation, then the fewest micro-batches, whose compiled
# peak stays under 60 GiB (JAX's default 75% of an 80 GiB H100). With more
# devices, global_batch_size must still divide by data x fsdp x microbatches.
PAPER_REMAT = {"468m": "none", "1b": "none", "7b": "full"}
PAPER_MICROBATCHES = {"468m": 8, "1b": 8, "7b": 32}


def paper_config(size: str) -> ml_collections.ConfigDict:
  """The paper's setup for one model size: AdamW lr 3e-4, wd 0.1, betas
  (0.9, 0.95), 2000 warm-up steps then cosine, 200k steps, MiLe gamma 1;
  bfloat16 compute, the chunked loss and scanned layers.

  The corpus and tokenizer must be set for a real run (the Pile and LLaMA's
  tokenizer in the paper): `--config.data.source=... --config.data.tokenizer_path=...`.
  """
  c = base_config()
  sizes = PAPER_MODELS[size]
  c.model.update(vocab_size=32000, n_kv_heads=sizes["n_heads"], dtype="bfloat16", remat=PAPER_REMAT[size],
                 scan_layers=True, **sizes)
  c.data.seq_len = sizes["max_seq_len"]
  c.data.global_batch_size = 512  # Not stated in the paper; ~0.5M tokens per step at 1024.
  c.optim.update(learning_rate=3e-4, warmup_steps=2000, final_lr_ratio=0.1, weight_decay=0.1)
  c.train.update(steps=200_000, log_every=100, eval_every=2000, eval_batches=32)
  c.checkpoint.update(every_steps=2000, max_to_keep=3)
  c.mesh.shape = (1, -1, 1)  # FSDP over all devices.
  c.train.microbatches = PAPER_MICROBATCHES[size]
  c.loss.impl = "chunked"  # Never holds the [tokens, 32000] logits; the same function as naive (tested).
  return c

