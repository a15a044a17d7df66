"""Chinese and Hindi on the diagnose page (issue 16, item 14), in a real headless Chromium.

A character split over several byte-level tokens is one chip (its latents merged, every position
kept), the latent page's examples show whole characters, the comparison view's summary counts only
what its per-layer blocks draw, and the streamed answer never carries U+FFFD when generation stops
inside a character. A screenshot with the glyphs goes to test-artifacts/diagnose-zh-hi.png.
"""

from __future__ import annotations

import re
import time

import pytest
import torch

from diagnose_helpers import ARTIFACTS, chromium_page, serve_tiny_engine
from safesail.diagnose.streaming import CallbackStreamer
from safesail.token_text import incomplete_tail, token_pieces

ZH = "请解释一下光合作用。"
HI = "भारत की राजधानी क्या है?"


def test_a_stream_cut_inside_a_character_has_no_replacement_character(tiny_model):
    tok = tiny_model.tokenizer
    ids = tok(ZH, add_special_tokens=False)["input_ids"]
    pieces = token_pieces(tok, ids)
    cut = next(i for i, p in enumerate(pieces) if p == "") + 1  # stop right after a character's first byte(s)
    got: list[str] = []
    streamer = CallbackStreamer(tok, got.append)
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt, skipped
    for i in ids[:cut]:
        streamer.put(torch.tensor([i]))
    streamer.end()
    text = "".join(got)
    assert "\ufffd" not in text and ZH.startswith(text) and len(text) < len(ZH)
    n = incomplete_tail(tok, ids[:cut])
    assert n >= 1 and tok.decode(ids[:cut - n]) == text
    assert incomplete_tail(tok, ids) == 0


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    line = f'{{"id": "photo", "domain": "violence", "en": "Explain photosynthesis.", "zh": "{ZH}", "hi": "{HI}"}}'
    with serve_tiny_engine(tiny_model, tmp_path_factory.mktemp("chars"), line) as srv:
        yield srv


@pytest.fixture(scope="module")
def page(server):
    with chromium_page(height=1000) as pg:
        yield pg


def _chips(page, strip: str) -> list[dict]:
    return page.eval_on_selector_all(f"{strip} .tok", "els => els.map(e => ({text: e.textContent, "
                                                      "positions: e.dataset.positions}))")


@pytest.mark.browser
@pytest.mark.parametrize("query", [ZH, HI])
def test_one_chip_per_character_with_merged_latents(server, page, tiny_model, query):
    page.goto(server.url + "/")
    page.wait_for_selector("#model-info:has-text('3 SAEs')")  # a selector, not a JS string: the page's CSP forbids eval
    page.fill("#query", query)
    page.click("#submit")
    page.wait_for_selector("#query-tokens .tok")
    chips = _chips(page, "#query-tokens")
    assert all(c["text"] not in ("·", "") and "\ufffd" not in c["text"] for c in chips), chips
    assert "".join(c["text"] for c in chips) == query
    positions = [int(p) for c in chips for p in c["positions"].split()]
    n_tokens = len(tiny_model.tokenizer(query, add_special_tokens=False)["input_ids"])
    assert len(positions) == n_tokens and positions == sorted(positions)  # every token's position is kept
    multi = next(i for i, c in enumerate(chips) if " " in c["positions"])  # a character over several tokens
    page.locator("#query-tokens .tok").nth(multi).click()
    page.wait_for_selector("#latent-table table.latents tbody tr")
    assert re.search(r"Token #\d+–\d+", page.text_content("#token-title"))
    ids = page.eval_on_selector_all("#latent-table tbody tr td:first-child", "e => e.map(x => x.textContent)")
    assert ids and len(ids) == len(set(ids))  # merged: each latent once
    # (the tiny random model's answer may hold invalid byte sequences, shown as U+FFFD: not a split character)
    assert page.console_errors == []


@pytest.mark.browser
def test_compare_summary_counts_what_the_blocks_draw_and_a_screenshot_has_glyphs(server, page):
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(server.url + "/#/compare")
    # polled from Python: a JS-string predicate needs eval, which the page's CSP refuses when Playwright polls
    deadline = time.monotonic() + 30
    while not page.input_value("#cmp-q-1") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert page.input_value("#cmp-q-1"), "the compare page did not fill its first query"
    page.click("#compare-submit")
    page.wait_for_selector("#compare-summary table tbody tr")
    page.wait_for_selector("#compare-groups .group")
    summary = page.evaluate("""() => {
      const heads = [...document.querySelectorAll('#compare-summary thead th')].map(e => e.textContent);
      return [...document.querySelectorAll('#compare-summary tbody tr')].map(tr => {
        const cells = [...tr.children].map(td => td.textContent);
        return Object.fromEntries(heads.map((h, i) => [h, cells[i]]));
      });
    }""")
    drawn = page.evaluate("""() => [...document.querySelectorAll('#compare-groups .group')].map(g => ({
      domain: g.dataset.domain,
      cols: Object.fromEntries([...g.querySelectorAll('h4')].map(h => {
        const m = h.textContent.match(/^(.*) \\((\\d+)\\)$/); return [m[1], Number(m[2])]; }))}))""")
    assert summary and drawn
    for row in summary:
        blocks = [g["cols"] for g in drawn if g["domain"] == row["domain"]]
        for col, value in row.items():
            if col == "domain":
                continue
            assert int(value) == sum(b.get(col, 0) for b in blocks), (row["domain"], col, row, blocks)
    assert any(int(r["some"]) > 0 for r in summary)  # three languages: some latents are in two of them
    # Whole characters in the per-language strips too, then a screenshot to look at.
    for lang in ("zh", "hi"):
        chips = _chips(page, f'.lang-col[data-lang="{lang}"] .tokens')
        assert chips and all(c["text"] != "·" for c in chips[:-1])
    page.screenshot(path=str(ARTIFACTS / "diagnose-zh-hi.png"), full_page=False)
