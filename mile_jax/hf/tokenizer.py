"""A run's SentencePiece model as a Hugging Face fast tokenizer (`tokenizer.json`).

transformers 5 (5.24 checked) loads a `tokenizer.json` whose `tokenizer_config.json` names
`LlamaTokenizer` by rebuilding the pipeline from the vocabulary and merges
alone: normalisation becomes a `Metaspace` pre-tokenizer, which adds the
"▁" word-boundary prefix only when the text does not already start with one
after spaces became "▁". SentencePiece always adds it (`add_dummy_prefix`), so
" A" is "▁▁A" there and "▁A" in the rebuilt tokenizer: one token instead of
two. The export therefore names the generic `PreTrainedTokenizerFast`, which
uses `tokenizer.json` as written, and writes SentencePiece's own
normalisation as normalizers on the whole text: (the model's precompiled
character map), (its extra-whitespace removal), `Prepend("▁")` for the dummy
prefix and `Replace(" ", "▁")`, with no pre-tokenizer, so that BPE sees the
same symbols SentencePiece does.

BPE: SentencePiece merges the adjacent pair whose merged piece has the
highest score; a BPE merge list ordered by the merged piece's score, holding
every split of every normal piece into two normal pieces, makes the same
choices. Unigram: the pieces and scores as they are (Viterbi in both), except
that pieces outside SentencePiece's lattice get a score no path chooses;
segmentations of exactly equal score (runs of one repeated character) break
ties differently in the two libraries, which no setting changes. Control pieces (`<s>`, `</s>`, `<pad>`) and byte pieces are in the
vocabulary but in no merge, and `split_special_tokens` keeps "<s>" typed in
text from becoming the control token, as in SentencePiece. Unknown
characters fall back to byte pieces in both.

`encode` with special tokens prepends the token that started every document
in training (BOS when the run set `data.add_bos`, else EOS, which ends the
previous document), so `tokenizer(text)` gives the model the context it was
trained with; that token is also the exported `bos_token`.
"""

import json
import os

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from mile_jax.hf.layout import HFError

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_UNIGRAM, _BPE = 1, 2
SPACE = "\u2581"

# Checked at every export: the exported tokenizer must encode these exactly as SentencePiece does.
CHECK_STRINGS = (
    "", " ", "  ", "A", " A", "  A", "A ", "Hello world", "Hello  world", " Hello world", "\n", "a\nb",
    "\n\n x", "\t tab", "héllo wörld", "日本語のテキスト", "emoji 😀 and \U0001f9ec", "\x00\x01\x7f", "<s> </s> <unk>",
    "<0x41>", SPACE, f"{SPACE}{SPACE}x", "\u200b zero width", "ﬁ ligature", "Ａ fullwidth", "1234567890",
    "   several   spaces   ", "\r\n", "def f(x):\n    return x + 1\n",
)


def _proto(serialized_model: bytes):
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(serialized_model)
  return proto


def _normalizer(proto):
  from tokenizers import normalizers, Regex  # pylint: disable=import-outside-toplevel
  spec = proto.normalizer_spec
  if proto.trainer_spec.treat_whitespace_as_suffix:
    raise HFError("the run's SentencePiece model treats whitespace as a suffix, which export does not convert")
  steps = []
  if spec.precompiled_charsmap:
    steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
  if spec.remove_extra_whitespaces:
    steps += [normalizers.Replace(Regex("^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
  if spec.add_dummy_prefix:
    steps.append(normalizers.Prepend(SPACE))
  if spec.escape_whitespaces:
    steps.append(normalizers.Replace(" ", SPACE))
  return normalizers.Sequence(steps)


def _bpe_merges(proto) -> list[tuple[str, str]]:
  """Every split of a normal piece into two normal pieces, by the merged piece's score (highest first)."""
  mergeable = {p.piece: i for i, p in enumerate(proto.pieces) if p.type in (_NORMAL, _USER_DEFINED)}
  merges = []
  for piece, i in mergeable.items():
    for k in range(1, len(piece)):
      if piece[:k] in mergeable and piece[k:] in mergeable:
        merges.append((-proto.pieces[i].score, i, piece[:k], piece[k:]))
  return [(left, right) for _, _, left, right in sorted(merges)]


def build(serialized_model: bytes):
  """A `tokenizers.Tokenizer` that encodes and decodes as the SentencePiece model does
  (no special tokens added; see `write` for the post-processor)."""
  from tokenizers import AddedToken, Tokenizer, decoders, models  # pylint: disable=import-outside-toplevel
  proto = _proto(serialized_model)
  model_type = proto.trainer_spec.model_type
  vocab = [p.piece for p in proto.pieces]
  unk_id = next((i for i, p in enumerate(proto.pieces) if p.type == _UNKNOWN), None)
  byte_fallback = proto.trainer_spec.byte_fallback
  if model_type == _BPE:
    model = models.BPE(vocab={p: i for i, p in enumerate(vocab)}, merges=_bpe_merges(proto),
                       unk_token=None if unk_id is None else vocab[unk_id], fuse_unk=True,
                       byte_fallback=byte_fallback)
  elif model_type == _UNIGRAM:
    # SentencePiece's lattice holds only normal and user-defined pieces; the others (score 0, the
    # highest) would win wherever their text is typed, so they get a score no path would choose.
    lowest = min((p.score for p in proto.pieces if p.type == _NORMAL), default=0.0)
    scores = [p.score if p.type in (_NORMAL, _USER_DEFINED) else lowest - 1e4 for p in proto.pieces]
    model = models.Unigram(list(zip(vocab, scores)), unk_id=unk_id, byte_fallback=byte_fallback)
  else:
    raise HFError(f"the run's SentencePiece model is of type {model_type} (word or char), which export does "
                  "not convert; only BPE and unigram models")
  tokenizer = Tokenizer(model)
  tokenizer.normalizer = _normalizer(proto)
  steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
  if proto.normalizer_spec.add_dummy_prefix:
    steps.append(decoders.Strip(" ", 1, 0))
  tokenizer.decoder = decoders.Sequence(steps)
  tokenizer.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                                for p in proto.pieces if p.type in (_CONTROL, _UNKNOWN)])
  user = [AddedToken(p.piece, special=False, normalized=True) for p in proto.pieces if p.type == _USER_DEFINED]
  if user:
    tokenizer.add_tokens(user)
  tokenizer.encode_special_tokens = True
  return tokenizer


def mismatches(serialized_model: bytes, tokenizer, strings=CHECK_STRINGS) -> list[str]:
  """The strings that `tokenizer` encodes or decodes differently from the SentencePiece model."""
  sp = spm.SentencePieceProcessor(model_proto=serialized_model)
  out = []
  for text in strings:
    ids = sp.encode(text)
    theirs = tokenizer.encode(text, add_special_tokens=False).ids
    if theirs != ids or tokenizer.decode(theirs, skip_special_tokens=False) != sp.decode(ids):
      out.append(text)
  return out


def write(out_dir: str, serialized_model: bytes, *, doc_start_id: int, model_max_length: int) -> None:
  """Writes tokenizer.json, tokenizer_config.json, special_tokens_map.json and the
  SentencePiece tokenizer.model itself into `out_dir`.

  Raises:
    HFError: the converted tokenizer encodes one of `CHECK_STRINGS` differently.
  """
  from tokenizers import processors  # pylint: disable=import-outside-toplevel
  tokenizer = build(serialized_model)
  bad = mismatches(serialized_model, tokenizer)
  if bad:
    raise HFError(f"the converted tokenizer encodes {len(bad)} check strings differently from the run's "
                  f"SentencePiece model, first {bad[0]!r}; tokenizer.json not written")
  sp = spm.SentencePieceProcessor(model_proto=serialized_model)
  start = sp.id_to_piece(doc_start_id)
  tokenizer.post_processor = processors.TemplateProcessing(
      single=f"{start}:0 $A:0", pair=f"{start}:0 $A:0 $B:1", special_tokens=[(start, doc_start_id)])
  os.makedirs(out_dir, exist_ok=True)
  tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
  special = {"bos_token": start}
  for key, piece_id in (("eos_token", sp.eos_id()), ("unk_token", sp.unk_id()), ("pad_token", sp.pad_id())):
    if piece_id >= 0:
      special[key] = sp.id_to_piece(piece_id)
  config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "split_special_tokens": True,
            "clean_up_tokenization_spaces": False, "model_max_length": model_max_length}
  for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
    with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
      json.dump(content, f, indent=2, ensure_ascii=False)
  with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
    f.write(serialized_model)
