"""lmq: serve many fine-tuned variants of one model, with images, on your own GPUs."""

from lmq.llm import LLM
from lmq.sampling import SamplingParams
from lmq.sequence import CompletionOutput, RequestOutput

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
