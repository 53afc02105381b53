"""lmq: serve many fine-tuned variants of one model, with images, on your own GPUs."""

from vision.torchvision_shim import ensure_torchvision

ensure_torchvision()  # before anything imports transformers, which may import torchvision

from lmq.inputs import TextPrompt, TokensPrompt  # noqa: E402
from lmq.llm import LLM  # noqa: E402
from lmq.lora_request import LoRARequest  # noqa: E402
from lmq.sampling import Logprob, SamplingParams  # noqa: E402
from lmq.sequence import CompletionOutput, RequestOutput  # noqa: E402

__all__ = ["LLM", "SamplingParams", "LoRARequest", "TextPrompt", "TokensPrompt", "RequestOutput",
           "CompletionOutput", "Logprob"]
__version__ = "0.1.0"
