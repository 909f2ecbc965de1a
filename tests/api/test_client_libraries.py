"""The OpenAI-compatible API as real client libraries use it, against a real `promptserve serve` process on
the embedded SmolLM2 (float32, the demo tasks seeded): the openai SDK, langchain-openai, LiteLLM and
lm-eval. Where an answer must make sense (structured outputs, tools) the real model answers."""

from __future__ import annotations

import asyncio
import json
import os
from enum import Enum
from pathlib import Path
from typing import Annotated

import pytest
from pydantic import BaseModel, Field

from app.settings import DEMO_PROMPT_SETS
from tests.servers import serving

pytestmark = pytest.mark.real_model

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    env = {"PROMPTSERVE_STORE_DIR": str(tmp_path_factory.mktemp("clients-store")), "PROMPTSERVE_DTYPE": "float32",
           "PROMPTSERVE_SEED_DIR": str(DEMO_PROMPT_SETS), "PROMPTSERVE_MAX_NUM_SEQS": "32"}
    with serving(env) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    from openai import OpenAI
    return OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Owner(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)


class Product(BaseModel):
    # every string bounded: at temperature 1 an unbounded string can run past max_tokens (then the answer is
    # cut, finish_reason "length", as OpenAI's would be); the grammar makes every finished answer valid
    title: str = Field(max_length=40)
    color: Color
    tags: list[Annotated[str, Field(max_length=20)]] = Field(max_length=3)
    owner: Owner


def test_openai_parse_gives_the_pydantic_model(client):
    completion = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Describe a red bicycle owned by Ann, 30."}],
        response_format=Product, max_tokens=200, temperature=0)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Product) and isinstance(parsed.owner, Owner)


def test_json_schema_holds_for_20_of_20_samples_at_temperature_1(base):
    """Nested objects, enums and arrays: every one of 20 sampled answers parses and validates."""
    from openai import AsyncOpenAI

    schema = Product.model_json_schema()
    client = AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)

    async def sample(seed: int):
        return await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Invent a product as JSON."}], temperature=1.0,
            seed=seed, max_tokens=250, n=5,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "product", "schema": schema, "strict": True}})

    async def all_samples():
        return await asyncio.gather(*(sample(seed) for seed in range(4)))

    answers = [c.message.content for r in asyncio.run(all_samples()) for c in r.choices]
    assert len(answers) == 20
    for text in answers:
        Product.model_validate_json(text)


def test_openai_tools_required_gives_parseable_arguments(client):
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                       "required": ["city", "unit"], "additionalProperties": False}}}]
    r = client.chat.completions.create(model=MODEL, tools=tools, tool_choice="required", max_tokens=120,
                                       messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    args = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and set(args) == {"city", "unit"}
    # the answer goes back with the tool's result, and the model answers in prose
    follow = client.chat.completions.create(model=MODEL, tools=tools, max_tokens=30, messages=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "21 degrees, sunny"}])
    assert follow.choices[0].message.content is not None or follow.choices[0].message.tool_calls


def test_openai_logprobs_n_and_models(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=5,
                                       logprobs=True, top_logprobs=3, n=3, temperature=0.9, seed=1)
    assert len(r.choices) == 3
    for choice in r.choices:
        assert choice.logprobs.content and all(len(t.top_logprobs) == 3 for t in choice.logprobs.content)
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL
    assert {"chat", "spam", "ner"} <= {m.id for m in client.models.list()}
    import openai
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       extra_body={"frobnicate": 1})
    assert refused.value.body["param"] == "frobnicate"


def test_classify_and_extract_tasks_through_the_openai_client(client):
    spam = client.chat.completions.create(model="spam", messages=[
        {"role": "user", "content": "WINNER!! You have won a free prize, call 09061701461 now to claim"}])
    assert spam.choices[0].message.content in ("spam", "ham")
    assert set(spam.choices[0].model_extra["scores"]) == {"spam", "ham"}
    ner = client.chat.completions.create(model="ner",
                                         messages=[{"role": "user", "content": "Barack Obama visited Paris"}])
    entities = json.loads(ner.choices[0].message.content)["entities"]
    assert entities == ner.choices[0].model_extra["entities"]


def test_langchain_structured_output_and_bind_tools(base):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=f"{base}/v1", api_key="unused", temperature=0, max_tokens=200,
                     max_retries=0)
    product = llm.with_structured_output(Product).invoke("Describe a green lamp owned by Bob, 41.")
    assert isinstance(product, Product)

    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return "sunny"

    # bind_tools' schema leaves additionalProperties unset: the forced call's arguments are exactly its keys
    # (the model once invented {"city": ..., "type": "string", "maxLength": 20} until max_tokens)
    message = llm.bind_tools([get_weather], tool_choice="required").invoke("Weather in Rome?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"
    assert set(message.tool_calls[0]["args"]) == {"city"}
    assert isinstance(message.tool_calls[0]["args"]["city"], str)


def test_litellm_maps_a_context_overflow(base):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetching of the cost map
    import litellm

    with pytest.raises(litellm.ContextWindowExceededError):
        litellm.completion(model=f"openai/{MODEL}", api_base=f"{base}/v1", api_key="unused", max_tokens=10,
                           messages=[{"role": "user", "content": "word " * 5000}], num_retries=0)


ITEMS = [
    ("The capital of France is", [" Paris", " Berlin", " Madrid", " Rome"], 0),
    ("The capital of Japan is", [" Seoul", " Tokyo", " Beijing", " Bangkok"], 1),
    ("Water freezes at a temperature of", [" 100 degrees", " 0 degrees", " 50 degrees", " 10 degrees"], 1),
    ("The largest planet in the solar system is", [" Mars", " Venus", " Jupiter", " Mercury"], 2),
    ("A week has", [" five days", " six days", " seven days", " ten days"], 2),
    ("The opposite of hot is", [" cold", " warm", " big", " fast"], 0),
    ("Two plus two equals", [" three", " four", " five", " six"], 1),
    ("The color of the clear sky on a sunny day is", [" green", " red", " blue", " black"], 2),
    ("Cats are a kind of", [" bird", " fish", " mammal", " insect"], 2),
    ("The sun rises in the", [" east", " west", " north", " south"], 0),
    ("Bees make", [" milk", " honey", " silk", " wool"], 1),
    ("The chemical symbol for gold is", [" Ag", " Au", " Fe", " Pb"], 1),
    ("The first month of the year is", [" March", " June", " January", " October"], 2),
    ("A triangle has", [" three sides", " four sides", " five sides", " six sides"], 0),
    ("Ice is frozen", [" fire", " water", " sand", " air"], 1),
    ("The author of Romeo and Juliet is", [" Dickens", " Tolstoy", " Shakespeare", " Homer"], 2),
]


def test_lm_eval_multiple_choice_matches_its_hf_backend(base, tmp_path, embedded_checkpoint):
    """lm-eval's local-completions (echo + logprobs through /v1/completions, the server's tokenizer through
    /tokenizer_info and /tokenize) scores a local multiple-choice task exactly as its own hf backend on the
    same float32 model: the same accuracy, the same choice on every item."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in ITEMS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "promptserve_mc.yaml").write_text(
        "task: promptserve_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n")
    manager = TaskManager(include_path=str(tmp_path / "tasks"))
    served = lm_eval.simple_evaluate(
        model="local-completions", tasks=["promptserve_mc"], task_manager=manager, log_samples=True,
        model_args=f"model={MODEL},base_url={base}/v1/completions,num_concurrent=1,max_retries=1,batch_size=4")
    local = lm_eval.simple_evaluate(
        model="hf", tasks=["promptserve_mc"], task_manager=manager, log_samples=True,
        model_args=f"pretrained={embedded_checkpoint},dtype=float32,device=cpu", batch_size=4)

    def picks(results):
        return {s["doc_id"]: s["acc"] for s in results["samples"]["promptserve_mc"]}

    figures = {"items": len(ITEMS), "served_acc": served["results"]["promptserve_mc"]["acc,none"],
               "hf_acc": local["results"]["promptserve_mc"]["acc,none"]}
    out = Path(os.environ.get("PROMPTSERVE_SCREENSHOT_DIR", Path(__file__).resolve().parents[2] / "test-artifacts"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm_eval_parity.json").write_text(json.dumps(figures, indent=2) + "\n")
    assert figures["served_acc"] == figures["hf_acc"], figures
    assert picks(served) == picks(local)
