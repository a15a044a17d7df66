"""Screenshot the diagnose page of a finished run (for the README).

    safesail serve &                     # the run to show (default: runs/demo)
    python scripts/screenshot_diagnose.py --url http://127.0.0.1:8765 --query "..." --out docs/img/diagnose.png

Drives Debian's Chromium through Playwright (flags as in DEVELOPERS.md): submits the
query, waits for the tokens, clicks the token with the most latents, saves the page.
"""

from __future__ import annotations

import argparse

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8765")
    ap.add_argument("--query", default="How do police investigate a terrorist attack on a train station?")
    ap.add_argument("--tokens", type=int, default=24, help="answer tokens")
    ap.add_argument("--out", default="docs/img/diagnose.png")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(args.url + "/")
        page.wait_for_function("document.getElementById('model-info').textContent.length > 0")
        page.fill("#query", args.query)
        page.fill("#max-new-tokens", str(args.tokens))
        page.click("#submit")
        page.wait_for_selector("#answer-tokens .tok", timeout=600_000)
        page.wait_for_function("!document.getElementById('submit').disabled", timeout=600_000)
        # the query token whose latent table is longest
        tokens = page.locator("#query-tokens .tok")
        best, best_n = 0, -1
        for i in range(tokens.count()):
            tokens.nth(i).click()
            n = page.locator("#latent-table tbody tr").count()
            if n > best_n:
                best, best_n = i, n
        tokens.nth(best).click()
        page.screenshot(path=args.out)
        browser.close()
        print(f"saved {args.out} (token #{best}, {best_n} latents)")


if __name__ == "__main__":
    main()
