"""Model families: load a checkpoint folder, turn samples into model inputs and token layouts.

A teacher and a student of one family share tokenizer, chat template and image processing, so the
same sample gives both identical `input_ids`; `TokenLayout.fingerprint` lets the cache and the
trainer check that, sample by sample, instead of trusting it.
"""

from __future__ import annotations

import abc
import copy
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from drivekd.data.sample import Sample
from drivekd.errors import AlignmentError, ConfigError, DataError, ModelError
from drivekd.families.capture import CAPTURE_IMPL
from drivekd.families.processors import load_processor
from drivekd.images import NUSCENES_CAMERA, ImageSettings, flag
from drivekd.roles import IGNORE_INDEX

log = logging.getLogger(__name__)

FAMILIES = ("internvl", "qwen2_5_vl")

_MODEL_TYPES = {"qwen2_5_vl": "qwen2_5_vl", "internvl": "internvl"}
# name -> Family subclass; each subclass registers itself when its module is imported (the package
# __init__ imports every family module, so importing any drivekd.families module fills this).
_FAMILY_CLASSES: dict[str, type["Family"]] = {}


def detect_family(path: str | Path) -> str:
    """The family of a local checkpoint folder, from its config.json."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{path}: no config.json; pass a local checkpoint folder saved with save_pretrained")
    cfg = json.loads(cfg_path.read_text())
    mt = cfg.get("model_type", "")
    if mt in _MODEL_TYPES:
        return _MODEL_TYPES[mt]
    if mt == "internvl_chat" or "InternVLChatModel" in cfg.get("architectures", []):
        raise ModelError(
            f"{path}: this is an original remote-code InternVL checkpoint (model_type {mt!r}). Convert it to the "
            "HF-native format first with transformers' InternVL conversion script "
            "(transformers/models/internvl/convert_internvl_weights_to_hf.py), or use an '-hf' checkpoint"
        )
    raise ModelError(f"{path}: unsupported model_type {mt!r}; drivekd supports {', '.join(FAMILIES)}")


def family_class(name: str) -> type["Family"]:
    """The Family subclass of a family name (as `detect_family` returns) or HF model_type."""
    try:
        return _FAMILY_CLASSES[_MODEL_TYPES.get(name, name)]
    except KeyError:
        raise ModelError(f"unknown family {name!r}; drivekd supports {', '.join(FAMILIES)}") from None


def model_config(path: str | Path):
    """The transformers config of a local checkpoint folder (config.json only, no weights)."""
    from transformers import AutoConfig

    detect_family(path)  # a clear error for a folder without config.json or of another family
    try:
        config = AutoConfig.from_pretrained(Path(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{path}: transformers cannot read its config.json ({_reason(e)}); fix or re-download the file") from None
    if silently_untied_head(path):
        config.tie_word_embeddings = False
    return config


def silently_untied_head(path: str | Path) -> bool:
    """True for a checkpoint whose text config says `tie_word_embeddings: false` while its top level
    says nothing, as the InternVL `-hf` conversions were written. transformers 5.x decides tying from
    the top level, which `InternVLConfig` defaults to true: such a model would be built with its
    output head tied to the embeddings (fewer parameters, and the trained `lm_head` at risk of being
    replaced). drivekd builds it untied, as its text config says (configs/models/README.md)."""
    raw = json.loads((Path(path) / "config.json").read_text())
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
    return "tie_word_embeddings" not in raw and text.get("tie_word_embeddings") is False


def _reason(e: Exception) -> str:
    msg = str(e)
    if "ignore_mismatched_sizes" in msg:  # the per-tensor report went to the log just above
        return "its weights' shapes do not match its config.json; transformers' load report above lists them"
    first = next((line.strip() for line in msg.splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first[:300]}"


def checkpoint_depth(path: str | Path) -> tuple[str, Depth]:
    """(family, depth) of a local checkpoint folder from its config.json: the one place drivekd reads
    a model's depth from a folder (its text layers are `depth.text`)."""
    family = detect_family(path)
    return family, family_class(family).depth(model_config(path))


def load_model(path, *, dtype=torch.float32, device="cpu", capture=True, attn="sdpa", trust_remote_code=False,
               placement: dict | None = None, model_class: type | None = None):
    """Load a checkpoint folder (safetensors only, no download).

    capture=True runs the language model through drivekd's capture function (stock sdpa unless a
    `capture_attention` block selects layers); attn="eager" is for reference comparisons.
    placement: from_pretrained arguments that place the weights themselves (`device_map`, or
    `distributed_config` for tensor parallelism; drivekd.teacher.parallel), the model then stays
    where they put it instead of moving to `device`; model_class: a subclass of the family's class
    to build (the tensor-parallel loader's, which supplies its own device mesh).
    """
    path = Path(path)
    family = detect_family(path)
    if not (path / "model.safetensors").is_file() and not (path / "model.safetensors.index.json").is_file():
        raise ModelError(f"{path}: no model.safetensors(.index.json); drivekd loads safetensors only (no pickle)")
    text_impl = CAPTURE_IMPL if capture and attn == "sdpa" else attn
    config = model_config(path)
    if silently_untied_head(path):
        log.warning("%s: config.json's text_config says tie_word_embeddings false and its top level says nothing "
                    "(transformers 5.x would tie the output head): loading it untied, its own lm_head kept", path)
    try:
        model = (model_class or family_class(family).model_class()).from_pretrained(
            path,
            config=config,
            dtype=dtype,
            attn_implementation={"text_config": text_impl, "vision_config": attn, "": attn},
            use_safetensors=True,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            **(placement or {}),
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AssertionError) as e:
        # Whatever transformers refuses (a pad id outside the embedding asserts; shapes that do not match config.json, a config value its
        # classes reject, a truncated file): one line naming the folder and the reason.
        raise ModelError(f"{path}: transformers cannot build this checkpoint ({_reason(e)}); check that config.json and "
                         "the weights belong together (re-download or re-save the checkpoint)") from None
    return model if placement else model.to(device)


def text_tp_plan(config) -> dict[str, str]:
    """The tensor-parallel plan transformers ships for the language model of a VLM config
    (module pattern -> style, e.g. `layers.*.self_attn.q_proj: colwise`), {} when it has none.
    Both families' text models (Qwen2, Qwen2.5-VL's text model) have one; their vision towers have
    none, so under `tp_plan="auto"` the vision tower is replicated on every rank."""
    text = getattr(config, "text_config", None) or config
    return dict(getattr(text, "base_model_tp_plan", None) or {})


@dataclass
class TokenLayout:
    """Where things are in one sample's (unpadded) token sequence."""

    sample_id: str
    input_ids: torch.Tensor  # (T,) int64
    vision: torch.Tensor  # (T,) bool: image placeholder positions (V)
    text: torch.Tensor  # (T,) bool: prompt+answer text positions, no specials, no vision (X)
    labels: torch.Tensor  # (T,) int64: token ids on the answer span, IGNORE_INDEX elsewhere
    answer_start: int
    fingerprint: str  # sha256 of the token ids (int32 little-endian bytes)

    @property
    def length(self) -> int:
        return int(self.input_ids.numel())


def token_fingerprint(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int32).cpu().numpy().astype("<i4").tobytes()).hexdigest()


@dataclass
class ModelInputs:
    """A padded batch: `tensors` go to the model as keyword arguments."""

    tensors: dict[str, torch.Tensor]
    layouts: list[TokenLayout]
    padding_side: str

    @property
    def sample_ids(self) -> list[str]:
        return [lay.sample_id for lay in self.layouts]

    def padded(self, name: str) -> torch.Tensor:
        """A per-token layout field (`vision`, `text`, `labels`) padded like input_ids: (B, T)."""
        T = self.tensors["input_ids"].shape[1]
        fill = IGNORE_INDEX if name == "labels" else False
        rows = []
        for lay in self.layouts:
            v = getattr(lay, name)
            pad = torch.full((T - v.numel(),), fill, dtype=v.dtype)
            rows.append(torch.cat([pad, v]) if self.padding_side == "left" else torch.cat([v, pad]))
        return torch.stack(rows)

    def to(self, device) -> "ModelInputs":
        self.tensors = {k: v.to(device) for k, v in self.tensors.items()}
        return self


@dataclass(frozen=True)
class Depth:
    """A model's depth from its config: text decoder layers, and vision layers by kind (in the
    family's `vision_layer_kinds` order: InternVL one kind, Qwen2.5-VL window and full attention)."""

    text: int
    vision: tuple[int, ...]
    uniform_text: bool = True  # False: text layers of several types (e.g. sliding + full attention)


class Family(abc.ABC):
    """Everything that differs between model families, in one subclass per family (one module each:
    drivekd/families/internvl.py, qwen2_5_vl.py). Class level, from config files alone: model class,
    image settings -> processor arguments, image tokens per camera, depth and layer kinds, the
    planner's synthetic image inputs. Instance level (`Family.from_pretrained(path)`, holding the
    processor): encoding samples into token layouts and model inputs."""

    name = ""
    display_name = ""  # in messages
    padding_side = "left"  # the family processor's own default
    vision_delimiter_tokens: tuple[str, ...] = ()
    image_keys: tuple[str, ...] = ()  # the [images] settings (drivekd.images.ImageSettings) that apply
    vision_layer_kinds: tuple[str, ...] = ()  # names of the vision tower's layer kinds (Depth.vision)
    processor_class: type | None = None  # drivekd's video-free subclass of the family's HF processor
    # --freeze groups (drivekd.trainer.trainable.PARAM_GROUPS) -> parameter-name prefixes in the HF
    # model; the longest matching prefix decides (embed_tokens is embeddings, not language).
    param_groups: dict[str, tuple[str, ...]] = {}
    # --lora's default targets (globs on module names): the language model's attention and MLP
    # projections (both families' text models are Qwen2-style decoders).
    lora_targets: tuple[str, ...] = ("model.language_model.layers.*.self_attn.[qkvo]_proj",
                                     "model.language_model.layers.*.mlp.*_proj")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            _FAMILY_CLASSES[cls.name] = cls

    def __init__(self, processor, *, text_tokens: str = "paper"):
        if text_tokens not in ("paper", "not_vision"):
            raise ValueError("text_tokens must be 'paper' (exclude specials) or 'not_vision' (reference code)")
        self.processor = processor
        self._image_memo: tuple = (None, None)  # (images key, decoded PIL images) of the last group
        self.tokenizer = processor.tokenizer
        self.text_tokens = text_tokens
        self.image_token_id = int(processor.image_token_id)
        self.pad_token_id = int(self.tokenizer.pad_token_id)
        self.eos_token_id = int(self.tokenizer.eos_token_id)
        # Every special/added control token (chat delimiters, image delimiters, padding): these are
        # neither vision nor text query positions in the paper's token sets.
        specials = set(self.tokenizer.all_special_ids) | self._vision_delimiters()
        specials |= {int(i) for i, t in self.tokenizer.added_tokens_decoder.items() if t.special}
        self.special_ids = torch.tensor(sorted(specials), dtype=torch.long)

    @classmethod
    def from_pretrained(cls, path, *, image_processing=None, text_tokens: str = "paper") -> "Family":
        """`image_processing`: `drivekd.images.ImageSettings` (the user's [images] settings) or raw kwargs."""
        klass = family_class(detect_family(path))
        ip = klass.load_image_processor(path, image_processing)
        return klass(load_processor(klass.processor_class, path, ip, **klass.processor_kwargs(path)), text_tokens=text_tokens)

    # ----- what each family defines -----
    @staticmethod
    @abc.abstractmethod
    def model_class():
        """The transformers class that loads this family's checkpoints."""

    @staticmethod
    @abc.abstractmethod
    def image_processor_class():
        """The family's PIL image processor (pinned: teacher and student must see the same pixels)."""

    @staticmethod
    @abc.abstractmethod
    def _overrides(settings: ImageSettings) -> dict:
        """Image-processor keyword arguments for the family's own settings (`image_keys`)."""

    @staticmethod
    @abc.abstractmethod
    def effective_image_settings(image_processor) -> dict:
        """The settings an image processor actually applies, in [images] keys: what the store records."""

    @classmethod
    @abc.abstractmethod
    def count_image_tokens(cls, image_processor, tile_tokens: int, image_size: tuple[int, int]) -> int:
        """Vision tokens one image of `image_size` (width, height) expands to under `image_processor`
        (processor arithmetic, no pixels); `tile_tokens`: tokens per tile for a tiling family."""

    @staticmethod
    @abc.abstractmethod
    def vision_depth(vision_config) -> tuple[int, ...]:
        """Vision layers by kind (`vision_layer_kinds` order)."""

    @staticmethod
    @abc.abstractmethod
    def set_vision_depth(vision_config, counts: tuple[int, ...]) -> None:
        """Give `vision_config` (a copy) `counts` vision layers by kind."""

    @staticmethod
    @abc.abstractmethod
    def synthetic_image_inputs(config, vision: torch.Tensor, cameras: int, tokens_per_camera: int) -> dict[str, torch.Tensor]:
        """Zero-pixel model inputs for `cameras` images of `tokens_per_camera` tokens each, matching
        the (T,) bool `vision` mask of one sample: what the planner feeds the model."""

    @abc.abstractmethod
    def expected_vision_tokens(self, enc) -> int:
        """Vision tokens the processor output `enc` (one sample, all its images) should expand to."""

    @abc.abstractmethod
    def _image_tokens(self, enc) -> int:
        """Vision tokens of one image from the image processor's output for it alone."""

    @staticmethod
    def rope_positions(model, tensors: dict, device) -> torch.Tensor | None:
        """Position ids of a whole unpadded sequence when the family's RoPE needs them passed
        explicitly (a suffix run against a cached prefix); None for plain 1-D positions."""
        return None

    @staticmethod
    def delimiter_ids(config) -> tuple[int | None, int | None]:
        """Token ids the config names around each image's tokens (start, end); None where it names none."""
        return None, None

    @classmethod
    def processor_kwargs(cls, folder: str | Path) -> dict:
        """Processor constructor arguments read from the checkpoint folder, beyond image processor and tokenizer."""
        return {}

    @classmethod
    def tokens_per_tile(cls, folder: str | Path) -> int:
        """Tokens per image tile for a tiling family (0: the family does not tile)."""
        return 0

    # ----- image settings (class level: config files only) -----
    @classmethod
    def processor_overrides(cls, settings: "ImageSettings | dict | None") -> dict:
        """Image-processor keyword arguments from the user's settings (a setting of another family is
        refused, naming it), or a raw kwargs dict passed through (programmatic use)."""
        if settings is None:
            return {}
        if not isinstance(settings, ImageSettings):
            return dict(settings)
        wrong = [k for k in settings.given() if k not in cls.image_keys]
        if wrong:
            owner = next((c.display_name for c in _FAMILY_CLASSES.values() if wrong[0] in c.image_keys), "another family's")
            raise ConfigError(
                f"{', '.join(flag(k) for k in wrong)} ([images].{wrong[0]}) applies to {owner} models, but this model is "
                f"{cls.display_name}: remove it from the command line or the [images] table"
            )
        return cls._overrides(settings)

    @classmethod
    def load_image_processor(cls, folder: str | Path, settings: "ImageSettings | dict | None" = None):
        """The checkpoint's image processor (PIL backend) with the user's settings applied."""
        folder = Path(folder)
        if not any((folder / n).is_file() for n in ("preprocessor_config.json", "processor_config.json")):
            raise ModelError(f"{folder}: no image-processor settings (preprocessor_config.json or processor_config.json); "
                             "copy them from the checkpoint: they decide how many tokens an image becomes")
        return cls.image_processor_class().from_pretrained(folder, **cls.processor_overrides(settings))

    @classmethod
    def image_tokens(cls, folder: str | Path, settings: "ImageSettings | dict | None" = None,
                     image_size: tuple[int, int] = NUSCENES_CAMERA) -> int:
        """Vision tokens (placeholder positions) one camera image of `image_size` (width, height) gives
        under the checkpoint's processor with `settings`: the count the processor path produces.
        Needs config.json and the image-processor files only (no tokenizer, no weights)."""
        return cls.count_image_tokens(cls.load_image_processor(folder, settings), cls.tokens_per_tile(folder), image_size)

    def image_settings(self) -> dict:
        """The image settings this processor applies, in [images] keys (recorded in the store)."""
        return self.effective_image_settings(self.processor.image_processor)

    # ----- depth and layer kinds (class level) -----
    @classmethod
    def depth(cls, config) -> Depth:
        """Text decoder layers and vision layers by kind of a model config (a transformers config)."""
        text = config.text_config
        types = getattr(text, "layer_types", None)
        return Depth(int(text.num_hidden_layers), tuple(cls.vision_depth(config.vision_config)),
                     types is None or len(set(types)) <= 1)

    @classmethod
    def with_depth(cls, config, depth: Depth):
        """A copy of `config` with `depth` layers (text layers of its first layer type)."""
        c = copy.deepcopy(config)
        t = c.text_config
        t.num_hidden_layers = depth.text
        if getattr(t, "layer_types", None) is not None:
            t.layer_types = list(t.layer_types[:1]) * depth.text
        if getattr(t, "max_window_layers", None) is not None:
            t.max_window_layers = min(t.max_window_layers, depth.text)
        cls.set_vision_depth(c.vision_config, depth.vision)
        return c

    def _vision_delimiters(self) -> set[int]:
        tok = self.tokenizer
        ids = {tok.convert_tokens_to_ids(n) for n in self.vision_delimiter_tokens}
        return {int(i) for i in ids if i is not None and i != tok.unk_token_id}

    def fingerprint(self) -> str:
        """Processor and chat-template fingerprint: settings that change token ids or pixels."""
        ip = self.processor.image_processor.to_dict()
        payload = {
            "family": self.name,
            "chat_template": self.processor.chat_template,
            "image_processor": {k: v for k, v in sorted(ip.items()) if k not in ("processor_class",)},
            "vocab": hashlib.sha256(json.dumps(self.tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest(),
            "image_seq_length": getattr(self.processor, "image_seq_length", None),
            "text_tokens": self.text_tokens,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

    # ----- messages -----
    @staticmethod
    def messages(sample: Sample, with_answer: bool) -> list[dict]:
        # Images first, then the question: samples about the same images share a token prefix.
        content = [{"type": "image"} for _ in sample.images] + [{"type": "text", "text": sample.question}]
        msgs = [{"role": "user", "content": content}]
        if with_answer:
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": sample.answer}]})
        return msgs

    def _images_key(self, sample: Sample) -> tuple:
        key = []
        for p in sample.images:
            try:
                st = p.stat()
                key.append((str(p), st.st_size, st.st_mtime_ns))
            except OSError:
                return ()  # unreadable: no memo, load_images raises the named error
        return tuple(key)

    def images(self, sample: Sample) -> list[Image.Image]:
        """The sample's decoded images, memoised for the last image group (raises DataError)."""
        key = self._images_key(sample)
        if key and self._image_memo[0] == key:
            return self._image_memo[1]
        imgs = self.load_images(sample)
        self._image_memo = (key, imgs) if key else (None, None)
        return imgs

    @staticmethod
    def load_images(sample: Sample) -> list[Image.Image]:
        imgs = []
        for p in sample.images:
            try:
                with Image.open(p) as im:
                    imgs.append(im.convert("RGB"))
            except (OSError, ValueError) as e:
                raise DataError(f"sample {sample.id}: cannot read image {p}: {e}. Fix or remove the file, or drop the sample from the data") from e
        return imgs

    # ----- one sample -----
    def encode(self, sample: Sample, with_answer: bool = True) -> tuple[dict[str, torch.Tensor], TokenLayout]:
        """Process one sample (unpadded). Returns the processor's tensors and the token layout."""
        proc = self.processor
        full_text = proc.apply_chat_template(self.messages(sample, with_answer), tokenize=False, add_generation_prompt=not with_answer)
        # Questions about one image group come in a row: decode and preprocess its images once.
        imgs = self.images(sample)
        with proc.image_group(self._image_memo[0]):
            enc = proc(images=imgs or None, text=[full_text], return_tensors="pt")
        ids = enc["input_ids"][0]
        T = ids.numel()
        if with_answer:
            prompt_text = proc.apply_chat_template(self.messages(sample, False), tokenize=False, add_generation_prompt=True)
            if not full_text.startswith(prompt_text):
                raise AlignmentError(f"sample {sample.id}: the chat template's prompt is not a prefix of the full conversation")
            tail = self.tokenizer(full_text[len(prompt_text):], add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            if tail.numel() == 0 or tail.numel() > T or not torch.equal(ids[T - tail.numel():], tail):
                raise AlignmentError(f"sample {sample.id}: cannot locate the answer span in the token ids (tokens merge across the prompt/answer boundary)")
            answer_start = T - tail.numel()
            labels = torch.full_like(ids, IGNORE_INDEX)
            # Label the answer and its end-of-turn token; not what the template appends after it.
            span = ids[answer_start:]
            eos = (span == self.eos_token_id).nonzero()
            end = answer_start + (int(eos[0]) + 1 if len(eos) else span.numel())
            labels[answer_start:end] = ids[answer_start:end]
        else:
            answer_start = T
            labels = torch.full_like(ids, IGNORE_INDEX)
        vision = ids == self.image_token_id
        if self.text_tokens == "paper":
            text = ~vision & ~torch.isin(ids, self.special_ids)
        else:
            text = ~vision
        expected = self.expected_vision_tokens(enc)
        if int(vision.sum()) != expected:
            raise AlignmentError(f"sample {sample.id}: {int(vision.sum())} image tokens in the text but the images give {expected}")
        tensors = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
        lay = TokenLayout(sample.id, ids, vision, text, labels, answer_start, token_fingerprint(ids))
        return tensors, lay

    def vision_tokens_per_image(self, sample: Sample) -> list[int]:
        """Number of vision tokens each image of `sample` contributes (processor arithmetic)."""
        return [self._image_tokens(self.processor.image_processor(images=[im], return_tensors="pt"))
                for im in self.load_images(sample)]

    # ----- batches -----
    def build_inputs(self, samples: Sequence[Sample], with_answer: bool = True, padding_side: str | None = None) -> ModelInputs:
        """Encode and pad a batch. Default padding: the family's own (left for InternVL, right for Qwen)."""
        side = padding_side or self.padding_side
        encoded = [self.encode(s, with_answer) for s in samples]
        T = max(lay.length for _, lay in encoded)
        cols: dict[str, list] = {}
        for tensors, lay in encoded:
            n = T - lay.length
            for k, v in tensors.items():
                if k in ("input_ids", "attention_mask", "mm_token_type_ids"):
                    fill = self.pad_token_id if k == "input_ids" else 0
                    pad = torch.full((1, n), fill, dtype=v.dtype)
                    v = torch.cat([pad, v], 1) if side == "left" else torch.cat([v, pad], 1)
                cols.setdefault(k, []).append(v)
        tensors = {k: torch.cat(v, 0) for k, v in cols.items()}
        return ModelInputs(tensors, [lay for _, lay in encoded], side)


def check_same_family(a: Family, b: Family, what_a="teacher", what_b="student") -> None:
    if a.name != b.name:
        raise AlignmentError(f"{what_a} is {a.name} but {what_b} is {b.name}: distillation needs one family (same tokenizer and image processing)")
    if a.fingerprint() != b.fingerprint():
        raise AlignmentError(
            f"{what_a} and {what_b} processors differ (chat template, tokenizer vocabulary or image settings); "
            "their token sequences would not line up position by position"
        )
