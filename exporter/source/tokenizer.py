"""The artifact's tokenizer: rebuilt from a GGUF's own vocabulary, and checked against the readers apps use.

transformers' GGUF conversion of a byte-level BPE vocabulary (`tokenizer.ggml.model` gpt2, SmolLM2's) writes a
SentencePiece-style tokenizer.json (byte fallback, a U+2581 decoder, `tokenizer_class` LlamaTokenizerFast) and
swaps BOS and EOS. The `tokenizers` library still encodes it almost right, but onnxruntime-genai reads the class
and turns every space into id -1, and the end-of-turn token is wrong everywhere. So a GGUF's tokenizer is built
here from its metadata, as llama.cpp defines it (docs/tokenizer.md):

* `gpt2`: byte-level BPE with the GGUF's merges, split first by the pre-tokenizer its `tokenizer.ggml.pre`
  names (PRE_TOKENIZERS);
* `llama`: SentencePiece BPE (byte fallback, U+2581 for spaces) with merges ranked by the GGUF's scores;
* control tokens are special, user-defined tokens are added tokens, and BOS/EOS/UNK/PAD ids and the
  add-BOS/add-EOS flags are the GGUF's.

Anything else fails with a one-line error: a silently different tokenizer is worse than none.

`check_artifact_tokenizer` then encodes a fixed sample (SAMPLE_LINES plus the chat template's turns) with the
source tokenizer and with every reader of the artifact's files that is installed (transformers, `tokenizers`,
onnxruntime-genai) and fails the export on the first text whose ids differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from exporter.errors import ModelError, TokenizerMismatchError

# llama.cpp's token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class PreTokenizer:
    """How a byte-level BPE splits text before merging, in tokenizer.json's terms (llama.cpp's llama-vocab.cpp
    lists the same splits as regexes per `tokenizer.ggml.pre`)."""

    split: str | None = None  # one regex, then ByteLevel without its own regex; None: ByteLevel's GPT-2 regex
    single_digits: bool = False  # every digit alone first (llama.cpp's "\p{N}" expression)
    nfc: bool = False  # Unicode NFC before splitting (Qwen2's tokenizer.json)
    tokenizer_class: str = "GPT2Tokenizer"  # what tokenizer_config.json names: onnxruntime-genai reads it


PRE_TOKENIZERS = {
    **dict.fromkeys(("default", "gpt-2", "gpt2", "mpt", "olmo", "jais"), PreTokenizer()),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"),
                    PreTokenizer(single_digits=True)),
    **dict.fromkeys(("llama-bpe", "llama3", "smaug-bpe"),
                    PreTokenizer(split=LLAMA3_REGEX, tokenizer_class="PreTrainedTokenizerFast")),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"),
                    PreTokenizer(split=QWEN2_REGEX, nfc=True, tokenizer_class="Qwen2Tokenizer")),
}


# ---------------------------------------------------------------------------------------------- GGUF

def gguf_metadata(path: Path) -> dict:
    """The `tokenizer.*` fields of a GGUF file as Python values."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError/struct errors on anything unreadable
        raise ModelError(f"cannot load model from {path}: {str(exc).splitlines()[0]}") from exc
    return {name: field.contents() for name, field in reader.fields.items() if name.startswith("tokenizer.")}


def gguf_tokenizer(path: Path):
    """A transformers fast tokenizer equal to the one the GGUF at `path` defines."""
    meta = gguf_metadata(Path(path))
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelError(f"{Path(path).name} has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if kind == "gpt2":
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise ModelError(f"{Path(path).name}: GGUF pre-tokenizer {pre!r} is not supported "
                             f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
        core, tokenizer_class = _byte_level_bpe(tokens, meta, PRE_TOKENIZERS[pre]), PRE_TOKENIZERS[pre].tokenizer_class
        add_bos_default = False
    elif kind == "llama":
        core, tokenizer_class = _sentencepiece_bpe(tokens, types, meta), "LlamaTokenizer"
        add_bos_default = True
    else:
        raise ModelError(f"{Path(path).name}: GGUF tokenizer model {kind!r} is not supported "
                         "(gpt2 byte-level BPE and llama SentencePiece are)")
    _add_special_tokens(core, tokens, types)

    def token(key):
        index = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    _set_post_processor(core, token("bos") if add_bos else None, token("eos") if add_eos else None,
                        byte_level=kind == "gpt2")
    return _wrap(core, tokenizer_class, bos=token("bos"), eos=token("eos"), unk=token("unknown"),
                 pad=token("padding"), add_bos=add_bos, add_eos=add_eos,
                 chat_template=meta.get("tokenizer.chat_template"),
                 end_of_turn=[tokens[i] for key in ("eot", "eom")
                              if (i := meta.get(f"tokenizer.ggml.{key}_token_id")) is not None])


def _byte_level_bpe(tokens: list[str], meta: dict, pre: PreTokenizer):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ModelError(f"the GGUF vocabulary repeats {len(tokens) - len(vocab)} token(s)")
    missing = next((m for m in merges if len(m) != 2 or "".join(m) not in vocab), None)
    if missing is not None:
        raise ModelError(f"the GGUF merge {' '.join(missing)!r} makes a token missing from its vocabulary")
    core = Tokenizer(models.BPE(vocab, merges, byte_fallback=False, fuse_unk=False))
    steps = []
    if pre.single_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if pre.split:
        steps.append(pre_tokenizers.Split(Regex(pre.split), behavior="isolated", invert=False))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=pre.split is None))
    core.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    if pre.nfc:
        core.normalizer = normalizers.NFC()
    core.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    return core


def _sentencepiece_bpe(tokens: list[str], types: list[int], meta: dict):
    """SentencePiece BPE as transformers' LlamaConverter writes it (legacy=False): merges from the scores
    (a pair's rank is its merged piece's score, then the pieces' ids, as SentencePieceExtractor orders them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    mergeable = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, USER_DEFINED)}
    merges = []
    for piece, index in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                merges.append((-scores[index], vocab[left], vocab[right], left, right))
    merges = [(left, right) for *_, left, right in sorted(merges)]
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    core = Tokenizer(models.BPE(vocab, merges, unk_token=tokens[unk] if unk is not None else None,
                                fuse_unk=True, byte_fallback=True))
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581",
                                                  prepend_scheme="first" if add_prefix else "never", split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    core.decoder = decoders.Sequence(steps)
    return core


def _add_special_tokens(core, tokens: list[str], types: list[int]) -> None:
    """Control tokens never split and are skipped when decoding; user-defined tokens never split."""
    from tokenizers import AddedToken

    def added(kind, special):
        return [AddedToken(tokens[i], special=special, normalized=False) for i, t in enumerate(types) if t == kind]

    core.add_special_tokens(added(CONTROL, True))
    core.add_tokens(added(USER_DEFINED, False))


def _set_post_processor(core, bos: str | None, eos: str | None, byte_level: bool) -> None:
    from tokenizers import processors

    steps = [processors.ByteLevel(trim_offsets=False)] if byte_level else []
    if bos or eos:
        single = " ".join(([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else []))
        pair = single + " " + " ".join(([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else []))
        special = [(t, core.token_to_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x)]
        steps.append(processors.TemplateProcessing(single=single, pair=pair, special_tokens=special))
    if steps:
        core.post_processor = steps[0] if len(steps) == 1 else processors.Sequence(steps)


def _wrap(core, tokenizer_class: str, *, bos, eos, unk, pad, add_bos: bool, add_eos: bool, chat_template,
          end_of_turn: list[str]):
    """The fast tokenizer around `core`, saved with `tokenizer_class` (onnxruntime-genai picks its BPE flavour
    from that name) and add_bos/add_eos flags that match the post-processor."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos, unk_token=unk,
                                        pad_token=pad, clean_up_tokenization_spaces=False)
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.init_kwargs.update(tokenizer_class=tokenizer_class, add_bos_token=add_bos, add_eos_token=add_eos)
    tokenizer.end_of_turn_tokens = [t for t in end_of_turn if t != eos]
    return tokenizer


def save_tokenizer(tokenizer, directory: Path) -> None:
    """save_pretrained, then tokenizer_config.json completed for readers other than transformers: the
    tokenizer class a GGUF's vocabulary implies (save_pretrained writes the Python class it was built with,
    PreTrainedTokenizerFast, which onnxruntime-genai does not take for byte-level BPE) and the chat template
    inline (transformers also writes it to chat_template.jinja)."""
    tokenizer.save_pretrained(directory, legacy_format=False)  # tokenizer.json only, however it was loaded
    path = Path(directory) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    wanted = tokenizer.init_kwargs.get("tokenizer_class")
    if wanted:
        config["tokenizer_class"] = wanted
    if getattr(tokenizer, "chat_template", None) and "chat_template" not in config:
        config["chat_template"] = tokenizer.chat_template
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Every id that ends a turn: the model's config and generation config EOS, the tokenizer's EOS, and a
    GGUF's end-of-turn/end-of-message tokens."""
    ids: set[int] = set()
    for config in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        value = getattr(config, "eos_token_id", None)
        ids |= set(value) if isinstance(value, (list, tuple)) else set() if value is None else {value}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    ids |= {tokenizer.convert_tokens_to_ids(t) for t in getattr(tokenizer, "end_of_turn_tokens", [])}
    return sorted(int(i) for i in ids)


# ---------------------------------------------------------------------------------------------- check

_SAMPLE_BASE = (
    "The capital of France is Paris.",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\t\tmore tabs\t",
    "line one\nline two\n\nline four\r\nwindows line",
    "    indented code: def f(x):\n        return x ** 2  # square",
    "Numbers: 0 7 42 365 2026 1,234,567.89 3.14159 -17 +8 1e-5 0x1F 10%",
    "Dates 02/12/2026, times 18:45:07, phone +44 (0)20 7946 0958",
    "Unicode: café naïve façade résumé Ærøskøbing Straße Œuvre",
    "Greek Ελληνικά, Cyrillic Привет мир, Arabic مرحبا بالعالم, Hebrew שלום",
    "CJK: 東京は日本の首都です。 北京欢迎你 서울특별시",
    "Emoji: 👍🏽 🚀✨ 👨‍👩‍👧 ❤️ and symbols € £ ¥ © ® ™ → ≤ ≥ ∞",
    "Punctuation!!! ... ?? -- — – “quoted” ‘single’ «guillemets» (parens) [brackets] {braces}",
    "URLs https://example.com/path?q=1&r=two#frag and mail someone@example.org",
    "Contractions: don't, I'm, we'll, they've, she'd, it's, DON'T, You'RE",
    "MiXeD CaSe words, ALLCAPS, snake_case_name, camelCaseName, kebab-case-name",
    "Whitespace runs:     five spaces,\t\t two tabs, \n\n\n three newlines",
    " ",
    "\n",
    "a",
    "zero-width\u200bjoiner and non\u00a0breaking space and soft\u00adhyphen",
    # Not "½": onnxruntime-genai 0.18 splits digits only where they are decimal (Nd), `tokenizers` and llama.cpp
    # wherever they are numeric (N): " ½" is one piece there and two here, with any tokenizer.json. Not "²,":
    # Gemma 3's vocabulary merges it, onnxruntime-genai does not (docs/tokenizer.md)
    "Math: x² + y² = z² and ∑ᵢ aᵢ, √2 ≈ 1.414, 3/4",
    "JSON: {\"key\": [1, 2, 3], \"nested\": {\"a\": null, \"b\": true}}",
    "Markdown: **bold** _italic_ `code` # Heading\n- item one\n- item two",
    "Repeated letters: aaaaaaaaaaaaaaaaaaaaaaaa bbbbbbbbbbbb !!!!!!!!!!!! ............",
    "A long sentence that goes on for a while, describing how small language models run on phones "
    "and single-board computers, so that the tokenizer sees many ordinary English words in a row.",
)
_SAMPLE_JOINS = ("", " ", "\n", "  ", "\t", ". ", "\n\n")


def sample_lines() -> list[str]:
    """A fixed sample of a few hundred texts: each base text alone, and joined with another by
    every separator (so whitespace meets letters, digits and symbols at every boundary)."""
    lines = list(_SAMPLE_BASE)
    for i, first in enumerate(_SAMPLE_BASE):
        for j, join in enumerate(_SAMPLE_JOINS):
            second = _SAMPLE_BASE[(i * 7 + j * 3 + 1) % len(_SAMPLE_BASE)]
            lines.append(first + join + second)
    return lines


def chat_samples(tokenizer) -> list[str]:
    """The chat template's rendering of a short conversation (its special tokens included), if it has one."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Hi! 👋"},
         {"role": "assistant", "content": "Hello. How can I help?"}, {"role": "user", "content": "2+2?"}],
    ]
    texts = []
    for messages in conversations:
        try:
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        except Exception:  # a template that rejects a role (no system turn, say): skip that conversation
            continue
    return texts


def artifact_readers(directory: Path) -> dict:
    """name -> encode(text) -> ids for every installed reader of the artifact's tokenizer files."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    directory = Path(directory)
    readers = {}
    fast = Tokenizer.from_file(str(directory / "tokenizer.json"))
    readers["tokenizers"] = lambda text: fast.encode(text, add_special_tokens=True).ids
    auto = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    readers["transformers"] = lambda text: auto(text, add_special_tokens=True)["input_ids"]
    genai = genai_tokenizer(directory)
    if genai is not None:
        readers["onnxruntime-genai"] = lambda text: [int(i) for i in genai.encode(text)]
    return readers


def genai_tokenizer(directory: Path):
    """onnxruntime-genai's tokenizer of the artifact (what Android/iOS/C# apps use), or None where
    onnxruntime-genai is not installed or the artifact has no genai_config.json."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        return None
    if not (Path(directory) / "genai_config.json").is_file():
        return None
    tokenizer = og.Tokenizer(og.Config(str(directory)))  # reads the tokenizer files only, not the model
    with_special_tokens(tokenizer)
    return tokenizer


def with_special_tokens(tokenizer) -> None:
    """Have an onnxruntime-genai tokenizer add BOS/EOS as the source tokenizer's post-processor says. Its
    encode leaves them out by default (0.18; transformers' add_special_tokens=False): Gemma 3's <bos> was
    missing. Apps that encode raw text for such a model set the same option; chat templates carry <bos>."""
    update = getattr(tokenizer, "update_options", None)  # onnxruntime-genai 0.8 and later
    if update is not None:
        update(add_special_tokens="true")


def check_artifact_tokenizer(source_tokenizer, directory: Path, texts: list[str] | None = None) -> dict:
    """Encode `texts` (default: the fixed sample and the chat template's turns) with the source tokenizer and
    every reader of the artifact's files; raise TokenizerMismatchError on the first text whose ids differ."""
    texts = texts if texts is not None else sample_lines() + chat_samples(source_tokenizer)
    readers = artifact_readers(directory)
    for text in texts:
        expected = source_tokenizer(text, add_special_tokens=True)["input_ids"]
        for name, encode in readers.items():
            got = encode(text)
            if got != expected:
                at = next((k for k, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
                raise TokenizerMismatchError(
                    f"the artifact's tokenizer read by {name} differs from the source's on {text[:60]!r}: "
                    f"id {at} is {got[at] if at < len(got) else 'missing'}, expected "
                    f"{expected[at] if at < len(expected) else 'nothing'}")
    return {"texts": len(texts), "readers": sorted(readers), "agreement": 1.0}
