"""Both real back ends on the embedded default model: a `transformers serve` subprocess
(OpenAI-compatible HTTP) and the local in-process client. Also the explain stage against
the server, changing only `llm=`. Requests are few and short: this runs on a 2-core CPU."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from safesail.interpret.clients.base import ChatRequest, LLMError
from safesail.interpret.clients.local import LocalClient
from safesail.interpret.clients.openai_http import OpenAIClient

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_url(cache_dir, tmp_path_factory):
    """`transformers serve <converted SmolLM2 folder>` on a free port; its base URL."""
    from safesail.models.smollm2 import ensure_smollm2

    folder = ensure_smollm2(cache_dir)
    exe = shutil.which("transformers") or str(Path(sys.executable).parent / "transformers")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([exe, "serve", str(folder), "--host", "127.0.0.1", "--port", str(port),
                                 "--device", "cpu", "--dtype", "float32"], stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited ({proc.returncode}): {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not come up in 240 s: {log_path.read_text()[-2000:]}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def local_client(default_model):
    return LocalClient(default_model.model, default_model.tokenizer, "smollm2-135m-instruct", context_window=2048,
                       batch_size=4, batch_wait_ms=50)


def _serve_cfg(url, *extra):
    from safesail.config import compose

    return compose(["llm=transformers-serve", f"llm.base_url={url}", *extra]).llm


QUESTIONS = ["Name three colors.", "What is 2+2? Answer briefly, please."]


def test_server_and_local_give_the_same_greedy_reply(serve_url, local_client):
    http = OpenAIClient.from_cfg(_serve_cfg(serve_url))
    reqs = [ChatRequest([{"role": "user", "content": q}], max_tokens=6) for q in QUESTIONS]

    async def go():
        remote = await http.chat(reqs[0])  # one request: the server is slow on a shared 2-core CPU
        batched = await asyncio.gather(*[local_client.chat(r) for r in reqs])
        alone = await local_client.chat(reqs[1])
        await http.aclose()
        return remote, batched, alone

    remote, batched, alone = asyncio.run(go())
    assert http.model_name.endswith("smollm2-135m-instruct")  # asked from GET /v1/models
    assert 2 in local_client.batches  # the two local requests ran as one generate() batch
    # Same weights, greedy: the server and the local back end agree, and left padding changes nothing.
    assert remote.text.strip() and remote.text == batched[0].text
    assert remote.prompt_tokens == batched[0].prompt_tokens > 0
    assert alone.text == batched[1].text


def test_server_faults_are_classified(serve_url):
    async def go():
        other = OpenAIClient(model="not-the-served-model", base_url=serve_url, max_retries=3, backoff_base_s=0.01)
        with pytest.raises(LLMError) as bad:
            await other.chat(ChatRequest([{"role": "user", "content": "hi"}], max_tokens=2))
        served = OpenAIClient.from_cfg(_serve_cfg(serve_url))
        with pytest.raises(LLMError) as nolp:
            await served.prompt_logprobs("The cat sat", [" on"])
        return bad.value, other.retries, nolp.value

    bad, retries, nolp = asyncio.run(go())
    assert bad.reason == "bad_request" and retries == 0  # a 4xx is not retried
    assert nolp.reason == "unsupported"  # transformers serve returns no logprobs


def test_local_prompt_logprobs_are_exact(default_model, local_client):
    prompt = "Count: 1, 2, 3,"
    out = asyncio.run(local_client.prompt_logprobs(prompt, ["4", " 4", "5", "<|im_end|>"]))
    tok = default_model.tokenizer
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(default_model.model(torch.tensor([ids])).logits[0].float(), -1)
    assert out.prompt_tokens == len(ids) == len(out.next_logprobs) == len(out.tokens)
    assert "".join(out.tokens) == prompt
    four = tok("4", add_special_tokens=False)["input_ids"][0]
    for i, row in enumerate(out.next_logprobs):
        assert row["4"] == pytest.approx(float(logp[i, four]), abs=1e-4)
    assert " 4" not in out.next_logprobs[0]  # two tokens in this vocabulary: left out
    assert out.next_logprobs[-1]["4"] > out.next_logprobs[-1]["5"]  # after "3," comes " 4" more than " 5"


def test_explain_stage_runs_against_transformers_serve(serve_url, tmp_path, smoke_cfg, tiny_model):
    """The explain stage, unchanged, with llm=transformers-serve; a second run costs no call.

    A 135M explainer may end in one of the stage's named model-level failures (a copied worked
    example, a generic reply, ...): the record says so, which is what the stage promises."""
    from collect_helpers import make_collected_run

    from safesail.interpret.explain import run_explain_stage

    cfg = smoke_cfg("explain.max_segments=1", "explain.max_tokens=10", "explain.latents=[3]")
    cfg.llm = _serve_cfg(serve_url)  # the smoke experiment makes the tiny model its own explainer
    make_collected_run(cfg, tiny_model)
    run_explain_stage(cfg, [])
    path = Path(cfg.run.dir) / "interpret" / "explanations.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["latent"] for r in recs] == [3]
    r = recs[0]
    assert r["model"].endswith("smollm2-135m-instruct") and not r["cached"]
    assert (r["status"] == "ok" and r["explanation"] and r["raw"] and r["prompt_tokens"] > 0) or \
        r["reason"] in ("wrong_language", "malformed_reply", "empty_reply", "copied_example", "generic_reply")
    # Lose the explanations, keep the response cache: the re-run asks the server nothing.
    path.unlink()
    (Path(cfg.run.dir) / "stages" / "explain.json").unlink()
    run_explain_stage(cfg, [])
    again = json.loads(path.read_text().splitlines()[0])
    if r["status"] == "ok":
        assert again["cached"] and again["explanation"] == r["explanation"]


def test_local_stops_at_a_stop_string(local_client):
    req = ChatRequest([{"role": "user", "content": "Name three colors."}], max_tokens=8, stop=["\n"])
    comp = asyncio.run(local_client.chat(req))
    assert comp.text == "1. Red" and comp.completion_tokens < 8  # the full reply is "1. Red\n2. Blue\n3. Green"
