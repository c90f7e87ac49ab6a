"""Image+text processors of both families, without torchvision.

The stock `Qwen2_5_VLProcessor` and `InternVLProcessor` refuse to build without torchvision
(their video processor needs it), and `AutoProcessor.from_pretrained` fails the same way. drivekd
never processes video, so these subclasses drop the video processor. The family classes
(`Family.load_image_processor`) pin the PIL image-processing backend: with torchvision installed
(GPU machines) transformers may pick another backend, and teacher and student must always see the
same pixels.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

from transformers import InternVLProcessor, Qwen2_5_VLProcessor

from drivekd.errors import ModelError


class _GroupImageMemo:
    """Reuse the image processing of the previous call when the same images come again.

    Several questions ask about one image group (up to 8 per six-camera group in Drive-KD data);
    processing six camera images costs more than the prefix-shared teacher pass of a question.
    The caller names the group for the duration of one call (`with proc.image_group(key): proc(...)`,
    key = image paths, sizes, mtimes; see `Family.encode`); outside such a block nothing is memoised.
    The memo holds one group.
    """

    _memo_key = None
    _memo = (None, None)

    @contextlib.contextmanager
    def image_group(self, key):
        """Within the block, calls whose images are group `key` reuse the previous processing of it."""
        self._memo_key = key
        try:
            yield self
        finally:
            self._memo_key = None

    def _process_images(self, images, **kwargs):
        key = self._memo_key
        if key is not None and self._memo[0] == key:
            processed, replacements = self._memo[1]
            return copy.copy(processed), list(replacements)
        out = super()._process_images(images, **kwargs)
        if key is not None:
            self._memo = (key, (copy.copy(out[0]), list(out[1])))
        return out


class Qwen2_5_VLProcessorNoVideo(_GroupImageMemo, Qwen2_5_VLProcessor):
    # ProcessorMixin derives its sub-processor attributes from this signature: no video_processor.
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=chat_template, **kwargs)


class InternVLProcessorNoVideo(_GroupImageMemo, InternVLProcessor):
    # image_seq_length must be explicit here, or it silently falls back to the default 256.
    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None, **kwargs):
        super().__init__(
            image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
            image_seq_length=image_seq_length, chat_template=chat_template, **kwargs,
        )


# drivekd's video-free class -> the transformers class it stands in for. A saved checkpoint names
# the transformers class (processor_config.json, tokenizer_config.json), so that AutoProcessor
# rebuilds the full processor wherever torchvision is installed; drivekd itself always loads the
# video-free class of the folder's family, whatever name the folder carries.
HF_PROCESSOR_CLASSES = {InternVLProcessorNoVideo: InternVLProcessor, Qwen2_5_VLProcessorNoVideo: Qwen2_5_VLProcessor}
# Files in which save_pretrained records the processor's class name.
_CLASS_NAME_FILES = ("processor_config.json", "tokenizer_config.json", "preprocessor_config.json")


def video_free_class(hf_name: str) -> type:
    """drivekd's video-free stand-in for the transformers processor class named `hf_name` (as a
    checkpoint's processor_config.json names it), for loading a folder without torchvision."""
    for ours, theirs in HF_PROCESSOR_CLASSES.items():
        if theirs.__name__ == hf_name or ours.__name__ == hf_name:
            return ours
    known = ", ".join(c.__name__ for c in HF_PROCESSOR_CLASSES.values())
    raise ValueError(f"no video-free processor for {hf_name!r} (drivekd has {known})")


def save_processor(processor, folder: str | Path) -> None:
    """`processor.save_pretrained(folder)`, naming the transformers class instead of drivekd's
    video-free subclass: the folder is then a drop-in checkpoint for `AutoProcessor` (which does not
    know drivekd's class and would fall back to a bare tokenizer, silently dropping images)."""
    folder = Path(folder)
    processor.save_pretrained(folder)
    hf = HF_PROCESSOR_CLASSES.get(type(processor))
    if hf is None:
        return
    for name in _CLASS_NAME_FILES:
        p = folder / name
        if not p.is_file():
            continue
        cfg = json.loads(p.read_text())
        if cfg.get("processor_class") == type(processor).__name__:
            cfg["processor_class"] = hf.__name__
            p.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _read_chat_template(path: Path, tokenizer) -> str | None:
    for name in ("chat_template.jinja",):
        if (path / name).is_file():
            return (path / name).read_text()
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text()).get("chat_template")
    proc_cfg = path / "processor_config.json"
    if proc_cfg.is_file():
        tmpl = json.loads(proc_cfg.read_text()).get("chat_template")
        if tmpl:
            return tmpl
    return getattr(tokenizer, "chat_template", None)


def load_processor(processor_class, path: str | Path, image_processor, **kwargs):
    """The processor of a local checkpoint folder: `processor_class` (one of the video-free classes
    above) around `image_processor` (the family's, settings applied: `Family.load_image_processor`),
    the folder's tokenizer and chat template. `kwargs`: the family's other processor arguments."""
    from transformers import AutoTokenizer

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    template = _read_chat_template(path, tokenizer)
    if not template:
        # Without one, apply_chat_template fails deep inside transformers on the first sample; a
        # base (non-chat) checkpoint or a folder assembled by hand lacks it.
        raise ModelError(f"{path}: no chat template (chat_template.jinja, chat_template.json, or a chat_template entry "
                         "in processor_config.json or tokenizer_config.json); copy it from the instruct checkpoint")
    return processor_class(image_processor=image_processor, tokenizer=tokenizer, chat_template=template, **kwargs)
