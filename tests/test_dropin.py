"""Drop-in: typical llama-cpp-python code gives the same results with powerinfer.Llama.

Each scenario below is ordinary llama-cpp-python usage written once against a ``Llama``
instance. It runs unchanged on ``llama_cpp.Llama``, on ``powerinfer.Llama`` and on
``powerinfer.Llama(use_mmap=True)`` (ours loads without mmap by default, stock with it; results
must not depend on that), checks what the API promises (stop sequences honoured, streams
concatenating to the full text, grammar output parsing as JSON...) and, for our classes, is
compared with stock's result on the same model: greedy and seeded text equal, logprobs close.

Gemma 3 270M (a base model whose GGUF carries no chat template: chat uses
``chat_format="gemma"``) for text; the synthetic model, whose GGUF has a chat template and a
1024-token vocabulary, for chat templates, grammars and JSON mode (a grammar is applied to
every vocabulary entry per token, which Gemma's 262k make slow).
"""
from __future__ import annotations

import copy
import functools
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator

import llama_cpp
import pytest

import powerinfer
from conftest import THREADS
from powerinfer.testmodels import write_test_model

CLASSES: dict[str, Callable[..., llama_cpp.Llama]] = {
    "llama_cpp": llama_cpp.Llama,
    "powerinfer": powerinfer.Llama,
    "powerinfer-mmap": functools.partial(powerinfer.Llama, use_mmap=True),
}
STOCK = "llama_cpp"


class Models:
    """One instance per class for a model file, opened on first use; stock results memoised."""

    def __init__(self, path: Path, **kwargs: Any) -> None:
        self.path, self.kwargs = path, kwargs
        self._open: dict[str, llama_cpp.Llama] = {}
        self._stock: dict[str, Any] = {}

    def __getitem__(self, name: str) -> llama_cpp.Llama:
        if name not in self._open:
            self._open[name] = CLASSES[name](str(self.path), **self.kwargs)
        return self._open[name]

    def run(self, name: str, scenario: Callable[[llama_cpp.Llama], Any]) -> tuple[Any, Any]:
        """(result for `name`, stock's result) of `scenario`."""
        got = scenario(self[name])
        if name == STOCK:
            self._stock[scenario.__name__] = got
        elif scenario.__name__ not in self._stock:
            self._stock[scenario.__name__] = scenario(self[STOCK])
        return copy.deepcopy(got), copy.deepcopy(self._stock[scenario.__name__])

    def close(self) -> None:
        for llm in self._open.values():
            llm.close()


@pytest.fixture(scope="module")
def gemma(gemma_path: Path) -> Iterator[Models]:
    # logits_all: llama-cpp-python's condition for logprobs
    models = Models(gemma_path, n_ctx=512, n_threads=THREADS, seed=1234, verbose=False, chat_format="gemma",
                    logits_all=True)
    yield models
    models.close()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Models]:
    path = write_test_model(tmp_path_factory.mktemp("dropin") / "tiny-q8_0.gguf", preset="tiny", wtype="q8_0")
    models = Models(path, n_ctx=512, n_threads=THREADS, verbose=False)
    yield models
    models.close()


def _close(got: list[float], want: list[float], tol: float = 1e-3) -> bool:
    return len(got) == len(want) and all(math.isclose(g, w, abs_tol=tol) for g, w in zip(got, want))


# -- scenarios: plain llama-cpp-python usage ------------------------------------------------

PROMPT = "The three primary colours are"


def greedy_completion(llm: llama_cpp.Llama) -> dict[str, Any]:
    out = llm(PROMPT, max_tokens=16, temperature=0.0, echo=True)
    choice = out["choices"][0]
    assert choice["text"].startswith(PROMPT)  # echo
    assert out["usage"]["completion_tokens"] <= 16
    return {"text": choice["text"], "finish_reason": choice["finish_reason"], "usage": out["usage"]}


def streamed_completion(llm: llama_cpp.Llama) -> str:
    full = llm.create_completion(PROMPT, max_tokens=16, temperature=0.0)["choices"][0]["text"]
    chunks = [c["choices"][0]["text"] for c in llm.create_completion(PROMPT, max_tokens=16, temperature=0.0,
                                                                      stream=True)]
    assert len(chunks) > 1 and "".join(chunks) == full
    return full


def stop_sequences(llm: llama_cpp.Llama) -> str:
    prompt = "1, 2, 3, 4,"
    out = llm(prompt, max_tokens=24, temperature=0.0, stop=[", 8", "\n\n"])
    text = out["choices"][0]["text"]
    assert out["choices"][0]["finish_reason"] == "stop" and ", 8" not in text
    streamed = "".join(c["choices"][0]["text"] for c in llm(prompt, max_tokens=24, temperature=0.0,
                                                              stop=[", 8", "\n\n"], stream=True))
    assert streamed == text
    return text


# logprobs: llama-cpp-python sorts the whole vocabulary in Python for every token, so few tokens

def completion_logprobs(llm: llama_cpp.Llama) -> dict[str, Any]:
    lp = llm(PROMPT, max_tokens=3, temperature=0.0, logprobs=2)["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) > 0
    # greedy: each chosen token is the most likely one
    assert all(math.isclose(max(top.values()), chosen, abs_tol=1e-6)
               for top, chosen in zip(lp["top_logprobs"], lp["token_logprobs"]))
    return lp


def seeded_sampling(llm: llama_cpp.Llama) -> list[str]:
    texts = [llm(PROMPT, max_tokens=16, temperature=0.9, top_k=40, seed=seed)["choices"][0]["text"]
             for seed in (7, 7, 8)]
    assert texts[0] == texts[1]  # same seed, same text
    return texts


def chat_logprobs(llm: llama_cpp.Llama) -> dict[str, Any]:
    out = llm.create_chat_completion([{"role": "user", "content": "Hello!"}], max_tokens=3, temperature=0.0,
                                     logprobs=True, top_logprobs=2)
    content = out["choices"][0]["logprobs"]["content"]
    assert all(len(t["top_logprobs"]) == 2 for t in content)
    return {"tokens": [t["token"] for t in content], "logprobs": [t["logprob"] for t in content]}


def chat(llm: llama_cpp.Llama) -> dict[str, Any]:
    messages = [{"role": "user", "content": "Name three primary colours."}]
    out = llm.create_chat_completion(messages, max_tokens=16, temperature=0.0)
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    chunks = list(llm.create_chat_completion(messages, max_tokens=16, temperature=0.0, stream=True))
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == choice["message"]["content"]
    return {"content": choice["message"]["content"], "finish_reason": choice["finish_reason"]}


def chat_template_from_gguf(llm: llama_cpp.Llama) -> str:
    assert llm.chat_format == "chat_template.default"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    content = llm.create_chat_completion(messages, max_tokens=12, temperature=0.0)["choices"][0]["message"]["content"]
    assert content
    return content


def grammar(llm: llama_cpp.Llama) -> dict[str, Any]:
    g = llama_cpp.LlamaGrammar.from_string(
        'root ::= "{" ws "\\"answer\\":" ws ("true" | "false") "," ws "\\"n\\":" ws [0-9] ws "}"\n'
        'ws ::= " "?', verbose=False)
    out = llm("Answer in JSON:", grammar=g, max_tokens=32, temperature=0.0)["choices"][0]
    assert out["finish_reason"] == "stop"
    value = json.loads(out["text"])
    assert set(value) == {"answer", "n"} and isinstance(value["answer"], bool)
    return value


def json_mode(llm: llama_cpp.Llama) -> Any:
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                               "ok": {"type": "boolean"}},
              "required": ["name", "ok"], "additionalProperties": False}
    out = llm.create_chat_completion([{"role": "user", "content": "A record, please."}], max_tokens=48,
                                     temperature=0.0, response_format={"type": "json_object", "schema": schema})
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop"
    value = json.loads(choice["message"]["content"])
    assert set(value) == {"name", "ok"}
    return value


def saved_state(llm: llama_cpp.Llama) -> str:
    llm.reset()
    llm.eval(llm.tokenize(b"Sparse neurons"))
    state = llm.save_state()
    first = llm("Sparse neurons", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    llm("something else entirely", max_tokens=4, temperature=0.0)
    llm.load_state(state)
    again = llm("Sparse neurons", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    assert again == first
    return first


# -- tests ------------------------------------------------------------------------------------

@pytest.fixture(params=list(CLASSES))
def cls(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.mark.parametrize("scenario", [greedy_completion, streamed_completion, stop_sequences, seeded_sampling, chat],
                         ids=lambda f: f.__name__)
def test_gemma_same_text(gemma: Models, cls: str, scenario: Callable[[llama_cpp.Llama], Any]) -> None:
    got, want = gemma.run(cls, scenario)
    assert got == want


def test_gemma_logprobs(gemma: Models, cls: str) -> None:
    got, want = gemma.run(cls, completion_logprobs)
    assert got["tokens"] == want["tokens"] and got["text_offset"] == want["text_offset"]
    assert _close(got["token_logprobs"], want["token_logprobs"])
    for g, w in zip(got["top_logprobs"], want["top_logprobs"]):
        assert set(g) == set(w) and _close([g[k] for k in w], list(w.values()))
    got, want = gemma.run(cls, chat_logprobs)
    assert got["tokens"] == want["tokens"] and _close(got["logprobs"], want["logprobs"])


@pytest.mark.parametrize("scenario", [chat_template_from_gguf, grammar, json_mode, saved_state],
                         ids=lambda f: f.__name__)
def test_synthetic_same_result(synthetic: Models, cls: str, scenario: Callable[[llama_cpp.Llama], Any]) -> None:
    got, want = synthetic.run(cls, scenario)
    assert got == want
