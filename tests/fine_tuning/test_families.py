"""A fine-tuning job on a checkpoint of another family than the shipped Llama (Qwen3's q/k norms, Gemma's
scaled embeddings and (1+w) norms, Phi-3's fused projections): the worker trains it from the job's files,
and the serving engine scores the stored result exactly as the worker's forward did (float32)."""

from __future__ import annotations

import json

import pytest
import torch

from app.engine.types import EngineRequest, Mode, PromptSetRef
from app.model.forward import DecoderForward
from app.services.fine_tuning import FineTuningService, JobRequest, PromptSetOptions
from app.settings import Settings
from app.task_types.encoding import classify_ids
from fine_tuning.files import FileBook
from fine_tuning.jobs import JobBook
from fine_tuning.worker import Worker
from prompt_store import PromptStore
from prompt_store import format as psf
from prompt_store.records import FileRecordStore
from tests.helpers import greedy, make_engine, run
from training.evaluate import classify_logits
from training.prompt_module import PromptModule


def rows(n: int, offset: int = 0) -> bytes:
    return "\n".join(json.dumps({"text": f"WIN a FREE cash prize, call {i}" if i % 3 == 0 else f"lunch at {i}?",
                                 "label": "spam" if i % 3 == 0 else "ham"}) for i in range(offset, offset + n)).encode()


async def _last(stream):
    out = None
    async for out in stream:
        pass
    return out


@pytest.mark.parametrize("name", ["qwen3", "gemma", "phi3"])
def test_a_job_on_another_family_trains_and_serves_what_it_scored(family_model, name, tmp_path):
    loaded = family_model(name)
    records = FileRecordStore(tmp_path / "store")
    store = PromptStore(tmp_path / "store")
    service = FineTuningService(FileBook(records), JobBook(records), store, loaded.spec.name)
    train = service.upload_file("train.jsonl", "fine-tune", rows(24))["id"]
    valid = service.upload_file("valid.jsonl", "fine-tune", rows(12, offset=100))["id"]
    job = service.create_job(JobRequest(model=loaded.spec.name, training_file=train, validation_file=valid, seed=1,
                                        hyperparameters={"n_epochs": 2, "batch_size": 4},
                                        prompt_set=PromptSetOptions(virtual_tokens=2)))
    worker = Worker(Settings(model=str(family_model.dir(name)), dtype="float32", store_dir=tmp_path / "store"))
    assert worker.run_once()
    done = service.get_job(job["id"])
    assert done["status"] == "succeeded", done
    info = store.resolve(done["fine_tuned_model"])
    ps = psf.parse_for_model(open(info.path, "rb").read(), loaded.spec)  # this family's fingerprint and shape
    texts = ["WIN a FREE cash prize now", "see you at lunch", "call now to claim"]
    module = PromptModule.from_prompt_set(DecoderForward(loaded.model), loaded.spec, ps).eval()
    expected = torch.softmax(classify_logits(module, loaded.tokenizer, texts, loaded.device), -1)
    ref = PromptSetRef(info.task, info.version, str(info.path), ps.meta.num_virtual_tokens, info.sha256)
    engine = make_engine(loaded)
    try:
        for text, want in zip(texts, expected):
            out = run(_last(engine.generate(EngineRequest(classify_ids(loaded.tokenizer, text), greedy(1), ref,
                                                          Mode.CLASSIFY))))
            torch.testing.assert_close(torch.tensor(out.scores), want, rtol=1e-4, atol=1e-5)
    finally:
        engine.stop()
