"""OpenAI chat messages with content parts -> messages a chat template renders, and the images.

    {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                 {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}

A message without images gets its text parts joined into one string (what every template
reads); one with images keeps its parts in order, images as {"type": "image"}, which LLaVA-style
templates turn into the model's placeholder token. Offline callers may also pass a PIL image
as {"type": "image_pil", "image_pil": image}.
"""

from __future__ import annotations

from dataclasses import dataclass

_IMAGE_TYPES = ("image_url", "image_pil")


@dataclass(frozen=True)
class ImageRef:
    where: str  # e.g. "messages[0].content[1]", for error messages
    source: object  # a URL string (http(s), data:, file:) or a PIL image


def _image_source(part: dict, where: str) -> object:
    if part["type"] == "image_pil":
        return part.get("image_pil")
    ref = part.get("image_url")
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str) or not url:
        raise ValueError(f"{where}.image_url: expected a URL string or {{'url': ...}}, got {ref!r}")
    return url


def template_messages(messages: list[dict]) -> tuple[list[dict], list[ImageRef]]:
    """-> (messages for `apply_chat_template`, the images in prompt order)."""
    out: list[dict] = []
    images: list[ImageRef] = []
    for i, msg in enumerate(messages):
        content = msg.get("content")
        if content is None or isinstance(content, str):
            out.append({**msg, "content": content or ""})
            continue
        parts: list[dict] = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": part.get("text") or ""})
            elif kind in _IMAGE_TYPES:
                images.append(ImageRef(where, _image_source(part, where)))
                parts.append({"type": "image"})
            else:
                raise ValueError(f"{where}.type={kind!r} is not supported: use 'text' or 'image_url'")
        if any(p["type"] == "image" for p in parts):
            out.append({**msg, "content": parts})
        else:
            out.append({**msg, "content": "".join(p["text"] for p in parts)})
    return out, images
