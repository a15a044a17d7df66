"""The steer control in a real headless Chromium (Playwright) against a live server on the tiny model:
pick a latent from a token's table, add it with a strength, regenerate, read both answers side by side."""

from __future__ import annotations

import pytest

from diagnose_helpers import ARTIFACTS, chromium_page, serve_tiny_engine

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    with serve_tiny_engine(tiny_model, tmp_path_factory.mktemp("steer-browser")) as srv:
        yield srv


@pytest.fixture(scope="module")
def page(server):
    with chromium_page(height=1200) as pg:
        yield pg


def test_steer_control_regenerates_side_by_side(server, page):
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(server.url + "/")
    page.wait_for_selector("#model-info:has-text('3 SAEs')")  # a selector, not a JS string: the page's CSP forbids eval
    page.fill("#max-new-tokens", "8")
    page.fill("#query", "Tell me a story about a dragon.")
    page.click("#submit")
    page.wait_for_selector("#query-tokens .tok")
    original = page.text_content("#answer")
    assert page.is_disabled("#steer-run")
    # pick the first latent of a token's table with its "steer" button
    page.locator("#query-tokens .tok").nth(2).click()
    page.wait_for_selector("#latent-table button.steer-pick")
    picked = page.locator("#latent-table button.steer-pick").first.get_attribute("data-neuron")
    page.locator("#latent-table button.steer-pick").first.click()
    assert page.input_value("#steer-id") == picked
    page.select_option("#steer-mode", "add")
    page.fill("#steer-strength", "60")
    page.click("#steer-add")
    assert page.text_content("#steer-edits li").startswith(f"{picked} add 60")
    page.click("#steer-run")
    page.wait_for_selector("#steer-result[data-done='1']")
    assert page.text_content("#steer-original .answer") == original
    steered = page.text_content("#steer-steered .answer")
    assert steered != original
    assert "refusal phrase" in page.text_content("#steer-original .refusal")
    assert page.locator("#steer-steered .tokens .tok").count() >= 1
    page.locator("#steer-steered .tokens .tok").first.click()
    page.wait_for_selector("#steer-steered .side-table table.latents, #steer-steered .side-table p.muted")
    page.screenshot(path=str(ARTIFACTS / "diagnose-steer.png"), full_page=True)
    # a layer without an SAE: the server's one sentence shows in the error box
    page.click("#steer-edits li button")
    page.fill("#steer-id", "2_5")
    page.select_option("#steer-mode", "ablate")
    page.click("#steer-add")
    page.click("#steer-run")
    page.wait_for_selector("#error:not([hidden])")
    assert "no SAE on layer 2" in page.text_content("#error")
    # a malformed id is refused on the page before any request
    page.fill("#steer-id", "abc")
    page.click("#steer-add")
    assert "not of the form layer_index" in page.text_content("#error")
    assert page.locator("#steer-edits li").count() == 1
    assert not [e for e in page.console_errors if "400" not in e]
