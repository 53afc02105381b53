"""lmq: serve many fine-tuned variants of one model, with images, on your own GPUs."""

from vision.torchvision_shim import ensure_torchvision

ensure_torchvision()  # before anything imports transformers, which may import torchvision

from lmq.llm import LLM  # noqa: E402
from lmq.sampling import SamplingParams  # noqa: E402
from lmq.sequence import CompletionOutput, RequestOutput  # noqa: E402

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
