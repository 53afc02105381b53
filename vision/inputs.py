"""ImageInputs: a model's way from what users pass (URLs, PIL images, vLLM-style prompt dicts) to
ProcessedImage tensors; shared by the offline LLM and the server."""

from __future__ import annotations

from PIL import Image

from lmq.chat_content import ImageRef
from lmq.config import ModelConfig
from lmq.multimodal import ProcessedImage
from vision.media import MediaConfig, MediaError, MediaLoader


class ImageInputs:
    def __init__(self, model: ModelConfig, media: MediaConfig | None = None) -> None:
        self.model = model
        self.loader = MediaLoader(media)
        self._preprocess = None
        if model.vision is not None:
            from vision.preprocess import ImagePreprocessor

            self._preprocess = ImagePreprocessor(model.path, model.vision)

    @property
    def accepted(self) -> bool:
        return self._preprocess is not None

    def load(self, refs: list[ImageRef]) -> list[Image.Image]:
        """URLs (or PIL images) -> PIL images; a MediaError names the part it came from."""
        self._require(len(refs))
        out = []
        for ref in refs:
            if isinstance(ref.source, Image.Image):
                out.append(ref.source)
                continue
            try:
                out.append(self.loader.load(ref.source))
            except MediaError as e:
                raise MediaError(f"{ref.where}: {e}") from None
        return out

    def process(self, images: list[Image.Image]) -> list[ProcessedImage]:
        self._require(len(images))
        bad = [i for i, im in enumerate(images) if not isinstance(im, Image.Image)]
        if bad:
            raise ValueError(f"multi_modal_data['image'][{bad[0]}] is a {type(images[bad[0]]).__name__}, "
                             "expected a PIL.Image.Image")
        return self._preprocess(images)

    def from_prompt(self, prompt: str | list[int] | dict) -> tuple[str | list[int], list[ProcessedImage] | None]:
        """A prompt, or vLLM's {"prompt" | "prompt_token_ids": ..., "multi_modal_data": {"image": one or a list}}."""
        if not isinstance(prompt, dict):
            return prompt, None
        unknown = set(prompt) - {"prompt", "prompt_token_ids", "multi_modal_data"}
        if unknown:
            raise ValueError(f"prompt dict has unsupported keys {sorted(unknown)}: use 'prompt' or "
                             "'prompt_token_ids', and 'multi_modal_data'")
        text = prompt.get("prompt", prompt.get("prompt_token_ids"))
        if text is None:
            raise ValueError("prompt dict needs 'prompt' (a string) or 'prompt_token_ids' (a list of ints)")
        data = prompt.get("multi_modal_data") or {}
        if set(data) - {"image"}:
            raise ValueError(f"multi_modal_data keys {sorted(set(data) - {'image'})} are not supported: only 'image'")
        images = data.get("image")
        if images is None:
            return text, None
        return text, self.process(images if isinstance(images, list) else [images])

    def _require(self, n: int) -> None:
        if n and not self.accepted:
            raise ValueError(f"this model does not accept images ({self.model.path} is a text-only model)")
