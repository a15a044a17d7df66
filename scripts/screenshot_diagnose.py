"""Screenshot the diagnose page of a finished run (for the README).

    safesail serve &                     # the run to show (default: runs/demo)
    python scripts/screenshot_diagnose.py --url http://127.0.0.1:8765 --query "..." --out docs/img/diagnose.png

Drives Debian's Chromium through Playwright (flags as in DEVELOPERS.md): submits the
query, waits for the tokens, clicks the token with the most latents, saves the page.
Chinese and Hindi need fonts with their glyphs, or the page shows empty boxes; the
script refuses to run without them (Debian: `apt-get install fonts-noto-cjk fonts-noto-core`).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys

NEEDED_FONTS = {"zh": ":lang=zh", "hi": ":lang=hi"}  # fontconfig patterns: a font covering the language

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def missing_fonts() -> list[str]:
    """Languages of NEEDED_FONTS without any installed font (by fontconfig's fc-list)."""
    if shutil.which("fc-list") is None:
        return list(NEEDED_FONTS)
    return [lang for lang, pattern in NEEDED_FONTS.items()
            if not subprocess.run(["fc-list", pattern], capture_output=True, text=True).stdout.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8765")
    ap.add_argument("--query", default="How do police investigate a terrorist attack on a train station?")
    ap.add_argument("--tokens", type=int, default=24, help="answer tokens")
    ap.add_argument("--out", default="docs/img/diagnose.png")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    missing = missing_fonts()
    if missing:
        sys.exit(f"error: no font for {', '.join(missing)} is installed, so those glyphs would be empty boxes; "
                 "install them (Debian: apt-get install fonts-noto-cjk fonts-noto-core) and run again.")

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
