"""Hand-made Safe-SAIL-format release files for the tiny model (tests of the diagnose stage).

Writes what Safe-SAIL publishes (see the shared reference on its artifacts):
`ckpt_layer{L}.pt` TopK SAEs, `indices_layer{L}.pt`, `quantile_layer{L}.pt` (top/bottom
activation tables measured on the tiny model itself) and an `en_db.json` whose entries
include script-injection explanations. The neuron DB imports them like the real release.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

from safesail.chat import encode_chat
from safesail.hooks import HookPoint, capture_activations

XSS_EXPLANATION = '<script>alert("xss")</script><img src=x onerror="alert(1)"> fires on everything'
XSS_QUERY = 'Tell me <script>alert("q")</script> and <img src=x onerror=alert(2)> now'
N_LATENTS = 256
K = 16
TOP_K_TABLE = 64
TEXTS = ["How do I bake bread at home?", "What is the capital of France?", "Tell me a story about a dragon.",
         "Explain photosynthesis in simple words.", "请解释一下光合作用。", "भारत की राजधानी क्या है?",
         "How can I make a weapon to hurt people?", "Write a poem about the sea and the wind."]


def topk_encode(ckpt: dict, x: torch.Tensor, k: int) -> torch.Tensor:
    """Safe-SAIL's TopK encoder: top-k of (x - pre_bias) W_enc^T + b_enc, ReLU, dense output."""
    pre = (x - ckpt["pre_encoder_bias._bias_reference"][0]) @ ckpt["encoder.weight"][0].T + ckpt["encoder.bias"][0]
    vals, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, vals.relu())


def make_ckpt(d_in: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N_LATENTS, d_in, generator=g) / d_in ** 0.5
    b = torch.zeros(N_LATENTS)
    b[0] = 100.0  # latent 0 fires on every token: its explanation carries the injection
    dec = w.T.clone()
    dec = dec / dec.norm(dim=0, keepdim=True)
    return {"pre_encoder_bias._bias_reference": torch.zeros(1, d_in), "encoder.weight": w[None],
            "encoder.bias": b[None], "decoder.weight": dec[None]}


def write_safesail_release(lm, layers: list[int], out: Path) -> dict:
    """Write the files; returns {'layers', 'n_latents', 'k', 'num_tokens', 'db': {key: entry}}."""
    out.mkdir(parents=True, exist_ok=True)
    ids = [encode_chat(lm.tokenizer, t, "You are a helpful assistant.") for t in TEXTS]
    points = [HookPoint(L) for L in layers]
    acts = {p.name: [] for p in points}
    for seq in ids:
        got = capture_activations(lm.model, torch.tensor([seq]), None, points)
        for p in points:
            acts[p.name].append(got[p.name][0])
    db: dict[str, dict] = {}
    domains = ["violence", "politics", "pornography", "terror"]
    for L in layers:
        ckpt = make_ckpt(lm.hidden_size, seed=L)
        torch.save(ckpt, out / f"ckpt_layer{L}.pt")
        codes = topk_encode(ckpt, torch.cat(acts[f"layers.{L}.mlp_out"]), K)
        selected = (codes > 0).sum(0).nonzero().flatten()
        indices = torch.cat([selected, selected[:3]])  # Safe-SAIL's lists carry duplicates
        torch.save(indices, out / f"indices_layer{L}.pt")
        top = codes[:, indices].topk(min(TOP_K_TABLE, codes.shape[0]), dim=0).values
        bottom = (-codes[:, indices]).topk(min(TOP_K_TABLE, codes.shape[0]), dim=0).values.neg()
        torch.save({"top_neuron_activations": top, "bottom_neuron_activations": bottom},
                   out / f"quantile_layer{L}.pt")
        for j, i in enumerate(selected.tolist()):
            if i == 0:
                db[f"{L}_0"] = {"explanation": XSS_EXPLANATION, "correlation_score": 0.61, "tag_list": ["violence"]}
            elif j % 3 == 0:
                db[f"{L}_{i}"] = {"explanation": f"Layer {L} latent {i}: mentions of {domains[j % 4]}",
                                  "correlation_score": round(0.2 + (j % 7) / 10, 3), "tag_list": [domains[j % 4]]}
            elif j % 3 == 1:
                db[f"{L}_{i}"] = {"explanation": f"Layer {L} latent {i}: punctuation and numbers",
                                  "correlation_score": 0.25, "tag_list": []}
    (out / "en_db.json").write_text(json.dumps(db, ensure_ascii=False, indent=1), encoding="utf-8")
    num_tokens = sum(len(seq) for seq in ids)
    return {"layers": layers, "n_latents": N_LATENTS, "k": K, "num_tokens": num_tokens, "db": db}


def build_tiny_db(lm, layers: list[int], folder: Path) -> Path:
    """Release files for the tiny model imported into a real neuron DB (`folder/neurons.sqlite`)."""
    from safesail.neurondb import import_safesail as imp

    rel_dir = folder / "release"
    info = write_safesail_release(lm, layers, rel_dir)
    found = imp.find_release_files(rel_dir)
    rel = imp.read_release(found["en_db"], found["indices"], found["quantile"], found["ckpt"])
    path = folder / "neurons.sqlite"
    imp.import_release(path, rel, model=lm.name, num_tokens=info["num_tokens"], sae_k=info["k"])
    return path


def make_engine(lm, db_path: Path, **settings):
    """A DiagnoseEngine on an already loaded model and a neuron DB file."""
    from safesail.diagnose.bindings import bind_saes
    from safesail.diagnose.engine import DiagnoseEngine, EngineSettings
    from safesail.neurondb import NeuronDB

    db = NeuronDB.open(db_path, readonly=True)
    saes = bind_saes(db, db_path, lm.device, lm.hidden_size, lm.num_layers)
    return DiagnoseEngine(lm, db, saes, EngineSettings(**{"max_new_tokens": 8, **settings}), db_path=str(db_path))


class LiveServer:
    """uvicorn serving an app on a free 127.0.0.1 port in a background thread."""

    def __init__(self, app):
        import socket
        import threading

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        import time

        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return self
            time.sleep(0.05)
        raise RuntimeError("uvicorn did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def serve_tiny_engine(lm, folder: Path, compare_line: str | None = None) -> LiveServer:
    """A LiveServer (use it as a context manager) of the diagnose app on the tiny model, SAEs on layers 0, 1, 3.

    With `compare_line`, that line is written to `folder/compare.jsonl` and served as the comparison presets."""
    from safesail.diagnose.api.common import ServerSettings
    from safesail.diagnose.server import create_app

    engine = make_engine(lm, build_tiny_db(lm, [0, 1, 3], folder), max_new_tokens=12, top=30)
    settings = ServerSettings()
    if compare_line is not None:
        presets = folder / "compare.jsonl"
        presets.write_text(compare_line + "\n", encoding="utf-8")
        settings = ServerSettings(compare_file=str(presets))
    return LiveServer(create_app(engine, settings))


@contextmanager
def chromium_page(height: int = 1000, record_dialogs: bool = False):
    """A Playwright page in headless /usr/bin/chromium, 1400 px wide; console errors collect in
    `page.console_errors`, and with `record_dialogs` dialogs are dismissed and their messages kept in `page.dialogs`."""
    import pytest

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing; install the Debian package chromium (see DEVELOPERS.md).")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        pg = browser.new_page(viewport={"width": 1400, "height": height})
        if record_dialogs:
            pg.dialogs = []
            pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
        pg.console_errors = []
        pg.on("console", lambda m: pg.console_errors.append(m.text) if m.type == "error" else None)
        yield pg
        browser.close()
